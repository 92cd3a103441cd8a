"""`nemo-ft serve engine=vllm`: vLLM (its own venv) serving the export's HF base with two LoRA adapters
trained on different tasks, checked through its OpenAI HTTP API against NeMo's own greedy generation.

Tolerance: none. Greedy tokens must be equal, id for id, with the stop at EOS in the same place (16 new
tokens, temperature 0): both sides compute in fp32 and export checked the HF weights to ~1e-5 logits.
"""
import time

import pytest

from nemo_ft.clients import ServeError, VllmClient, run_load
from tests.conftest import REPO, read_jsonl
from tests.serve.conftest import MAX_NEW, hf_eos, load_killed_midway, need_serve_env, prompts, serving


@pytest.fixture(scope="module")
def vllm_lora(lookup_export, qa_export, tmp_path_factory):
    need_serve_env("vllm")
    with serving("vllm", lookup_export, tmp_path_factory.mktemp("vllm"),
                 f"adapters=['lookup={lookup_export}','qa={qa_export}']") as served:
        yield served


def client(served, export, timeout_s=30.0):
    return VllmClient(served.url, eos_id=hf_eos(export), timeout_s=timeout_s)


def test_models_lists_the_base_and_each_adapter_with_a_spare_lora_slot(vllm_lora, lookup_export):
    listed = {m["id"]: m for m in client(vllm_lora, lookup_export).models()}
    assert set(listed) == {"base", "lookup", "qa"}
    assert listed["lookup"]["parent"] == "base" and listed["qa"]["parent"] == "base"
    assert listed["lookup"]["root"].endswith("lookup/hf_peft")
    from nemo_ft.runtime.servers import cmdline
    argv = cmdline(vllm_lora.info["server_pid"]).split()
    assert argv[argv.index("--max-loras") + 1] == "3"  # 2 adapters + the free slot base requests need
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_each_adapter_and_the_base_equal_nemo_token_for_token(vllm_lora, lookup_export, nemo_answers):
    c = client(vllm_lora, lookup_export)
    checked = 0
    for model, ps in (("lookup", prompts("lookup")), ("qa", prompts("qa")), ("base", prompts("lookup") + prompts("qa"))):
        for p in ps:
            got = c.complete(model, p, MAX_NEW)
            want = nemo_answers[(model, p)]
            assert got.ids == want, (model, p, got.ids, want)
            assert got.finish_reason == ("stop" if len(want) < MAX_NEW else "length"), (model, p)  # EOS alike
            checked += 1
    assert checked == 2 * (40 + 16)
    # The comparison can fail: each adapter changes the answers, and the lookup adapter does its task.
    lookup = [nemo_answers[("lookup", p)] for p in prompts("lookup")]
    base = [nemo_answers[("base", p)] for p in prompts("lookup")]
    assert sum(a != b for a, b in zip(lookup, base)) >= 35
    rows = read_jsonl(REPO / "data" / "sample" / "lookup_test.jsonl")
    right = sum(c.complete("lookup", r["input"], MAX_NEW).text == r["output"] for r in rows)
    assert right >= 30, f"lookup adapter through vLLM: {right}/40 held-out exact"


def mixed_jobs(c, n):
    """n jobs over (model, prompt) pairs where base, lookup and qa answer the same prompt differently (so
    an answer crossed between adapters, or a base request given an adapter, cannot go unnoticed)."""
    pool = prompts("lookup")[:12] + prompts("qa")[:4]
    seq = {(m, p): c.complete(m, p, MAX_NEW).ids for p in pool for m in ("base", "lookup", "qa")}
    distinct = [p for p in pool if len({tuple(seq[(m, p)]) for m in ("base", "lookup", "qa")}) == 3]
    assert len(distinct) >= 10, f"only {len(distinct)} prompts tell the three models apart"
    pairs = [(m, p) for p in distinct for m in ("base", "lookup", "qa")]
    return [pairs[i % len(pairs)] for i in range(n)], seq


def test_concurrent_mixed_requests_equal_the_sequential_answers(vllm_lora, lookup_export, nemo_answers):
    """8 clients x 25 requests, base/lookup/qa interleaved: every answer is the sequential one. Base
    requests batched with adapter requests are where vLLM 0.32 would apply an adapter to the base if no
    LoRA slot were free (SERVING_CPU.md); serve keeps one free."""
    c = client(vllm_lora, lookup_export)
    jobs, seq = mixed_jobs(c, 200)
    result = run_load(lambda: client(vllm_lora, lookup_export), jobs, clients=8, max_tokens=MAX_NEW)
    assert not result.errors, result.errors[:3]
    wrong = [(job, a.ids, seq[job]) for job, a in zip(jobs, result.answers) if a.ids != seq[job]]
    assert not wrong, f"{len(wrong)} of 200 answers differ from the sequential ones, e.g. {wrong[:2]}"
    for (m, p), ids in seq.items():  # and the sequential answers are NeMo's
        if (m, p) in nemo_answers:
            assert ids == nemo_answers[(m, p)], (m, p)


def test_unknown_adapter_is_a_clear_error_and_the_server_keeps_serving(vllm_lora, lookup_export, nemo_answers):
    c = client(vllm_lora, lookup_export)
    with pytest.raises(ServeError) as err:
        c.complete("lookpu", "Name: Italy. Town: Lima.\nTown?", MAX_NEW)
    assert err.value.status == 404 and "lookpu" in str(err.value) and "does not exist" in str(err.value)
    p = prompts("lookup")[0]
    assert c.complete("lookup", p, MAX_NEW).ids == nemo_answers[("lookup", p)]


def test_merged_hf_without_lora_equals_the_lora_request_and_a_killed_server_fails_clients_fast(
        lookup_export, nemo_answers, tmp_path):
    """merged/merged_hf (W + (alpha/r) B A folded in) served as a plain model = the LoRA request = NeMo.
    Then its vLLM process is killed mid-load: every client gets an error within its timeout (no hang),
    the stage reports the death (exit 1, the server's log) and nothing is left running."""
    need_serve_env("vllm")
    with serving("vllm", lookup_export, tmp_path, "merged=true", expect=1) as served:
        c = client(served, lookup_export, timeout_s=10.0)
        assert [m["id"] for m in c.models()] == ["base"]
        for p in prompts("lookup"):
            assert c.complete("base", p, MAX_NEW).ids == nemo_answers[("lookup", p)], p

        served.refresh_pids()
        jobs = [("base", p) for p in prompts("lookup")] * 10
        elapsed = load_killed_midway(served, lambda: client(served, lookup_export, timeout_s=10.0), jobs)
        assert elapsed < 60, f"clients took {elapsed:.0f} s to notice the dead server"
        served.proc.wait(timeout=60)
    out = served.output()
    assert "the server failed: vLLM exited" in out and "the last lines of" in out, out[-3000:]


@pytest.mark.parametrize("why", ["exits", "too_slow"])
def test_a_server_that_does_not_come_up_is_stopped_with_its_own_log(why, lookup_export, tmp_path):
    """vLLM refusing its arguments (exits at once) or missing the readiness deadline: exit 1, the tail of
    vLLM's own log on stderr, and no process left."""
    import subprocess

    from tests.conftest import _free_port, stage_env
    from tests.serve.conftest import REPO, alive, serve_args, tree
    need_serve_env("vllm")
    extra = ["vllm.extra_args=[--no-such-flag]"] if why == "exits" else ["ready_timeout_s=3"]
    proc = subprocess.Popen(serve_args("vllm", lookup_export, _free_port(), tmp_path / "r", *extra), cwd=REPO,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = set()
    while proc.poll() is None:
        seen |= set(tree(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert err.startswith("nemo-ft serve: the server failed: "), err[-3000:]  # one message, then vLLM's log
    if why == "exits":
        assert "exited with code" in err and "before it was ready" in err and "--no-such-flag" in err, err[-3000:]
    else:
        assert "not ready after 3 s" in err and "the last lines of" in err, err[-3000:]
    assert len(seen) > 1 and not alive(seen)
