"""`nemo-ft serve engine=triton`: PyTriton serving NeMo itself (base .nemo + adapter .nemo files, NeMo's
greedy), each adapter chosen by name, checked with tritonclient against NeMo's own generation run
apart (tests/e2e/model_probe.py). Tolerance: none, greedy ids must be equal.

Three adapters: lookup and qa share a PEFT config (one restored model, weights swapped per request);
qkv8 has another (rank 8, qkv only) and gets a model of its own.
"""
import pytest

from nemo_ft.clients import ServeError, TritonClient, run_load
from tests.serve.conftest import BASE, MAX_NEW, load_killed_midway, model_probe, need_serve_env, prompts, serving


@pytest.fixture(scope="module")
def triton(lookup_export, qa_export, qkv8_export, tmp_path_factory):
    need_serve_env("triton")
    with serving("triton", lookup_export, tmp_path_factory.mktemp("triton"),
                 f"adapters=['lookup={lookup_export}','qa={qa_export}','qkv8={qkv8_export}']") as served:
        yield served


def test_each_adapter_by_name_and_the_base_equal_nemo_token_for_token(triton, nemo_answers, qkv8_export, tmp_path):
    c = TritonClient(triton.url)
    for model, ps in (("lookup", prompts("lookup")), ("qa", prompts("qa")), ("base", prompts("lookup") + prompts("qa"))):
        for p in ps:
            got = c.complete(model, p, MAX_NEW)
            assert got.ids == nemo_answers[(model, p)], (model, p, got.ids, nemo_answers[(model, p)])
    # the adapter with its own PEFT config, against NeMo with that adapter restored alone
    ps = prompts("lookup")[:12]
    want = model_probe(tmp_path, BASE, "greedy", ps, adapter=qkv8_export / "adapter_tp1.nemo", max_new=MAX_NEW)
    for p, g in zip(ps, want["generations"]):
        assert c.complete("qkv8", p, MAX_NEW).ids == g["ids"], p
    assert sum(g["ids"] != nemo_answers[("base", p)] for p, g in zip(ps, want["generations"])) >= 6
    # served text continues the prompt as vLLM's does (" Lima.", not "Lima.")
    assert c.complete("lookup", "Name: Italy. Town: Lima.\nTown?", MAX_NEW).text.startswith(" ")
    c.close()


def test_concurrent_mixed_requests_equal_the_sequential_answers(triton, nemo_answers):
    """8 clients x 25 requests over base/lookup/qa/qkv8 on the same prompts: nothing lost, nothing crossed."""
    c = TritonClient(triton.url)
    pool = prompts("lookup")[:10] + prompts("qa")[:4]
    names = ("base", "lookup", "qa", "qkv8")
    seq = {(m, p): c.complete(m, p, MAX_NEW).ids for p in pool for m in names}
    distinct = [p for p in pool if len({tuple(seq[(m, p)]) for m in names}) == len(names)]
    assert len(distinct) >= 8, f"only {len(distinct)} prompts tell the four models apart"
    pairs = [(m, p) for p in distinct for m in names]
    jobs = [pairs[i % len(pairs)] for i in range(200)]
    result = run_load(lambda: TritonClient(triton.url), jobs, clients=8, max_tokens=MAX_NEW)
    assert not result.errors, result.errors[:3]
    wrong = [(job, a.ids, seq[job]) for job, a in zip(jobs, result.answers) if a.ids != seq[job]]
    assert not wrong, f"{len(wrong)} of 200 answers differ from the sequential ones, e.g. {wrong[:2]}"
    for key, ids in seq.items():
        if key in nemo_answers:
            assert ids == nemo_answers[key], key
    c.close()


def test_unknown_adapter_is_a_clear_error_and_the_server_keeps_serving(triton, nemo_answers):
    c = TritonClient(triton.url)
    with pytest.raises(ServeError) as err:
        c.complete("lookpu", "Name: Italy. Town: Lima.\nTown?", MAX_NEW)
    assert "unknown model" in str(err.value) and "lookpu" in str(err.value)
    with pytest.raises(ServeError) as err:  # a row that cannot be served is refused alone
        c.complete("lookup", "x " * 200, MAX_NEW)
    assert "exceeds the model's context" in str(err.value)
    p = prompts("lookup")[0]
    assert c.complete("lookup", p, MAX_NEW).ids == nemo_answers[("lookup", p)]
    c.close()


def test_a_killed_triton_server_fails_clients_fast_and_leaves_nothing(lookup_export, tmp_path):
    """SIGKILL to the Triton server process mid-load: clients get errors within their timeout, not hangs;
    the stage reports it (exit 1) and its teardown leaves no process."""
    need_serve_env("triton")
    with serving("triton", lookup_export, tmp_path, expect=1) as served:
        assert served.info["server_pid"] in {pid for pid, _ in served.pids}
        jobs = [("lookup", p) for p in prompts("lookup")] * 10
        elapsed = load_killed_midway(served, lambda: TritonClient(served.url, timeout_s=10.0), jobs)
        assert elapsed < 60
        served.proc.wait(timeout=60)
    assert "the server failed: Triton stopped" in served.output(), served.output()[-3000:]
