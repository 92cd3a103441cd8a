"""`nemo-ft eval` on the learnable lookup task: a trained adapter passes its gates on held-out rows; the base
alone and a zero adapter fail them (exit 3, the gates named); bad inputs are exit 2 before any model."""
import json

import pytest

from tests.conftest import REPO, SAMPLE, model_probe, read_jsonl, run_stage, tiny_token_ids, assert_refused

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def trained(lookup_pipeline):
    return lookup_pipeline


def _eval(out, *args, check=True):
    return run_stage("eval", f"out_dir={out}", *args, check=check, timeout=400)


def test_trained_adapter_passes_its_gates_and_the_report_adds_up(trained, tmp_path):
    out = tmp_path / "eval"
    proc = _eval(out, f"from_run={trained / 'export'}")
    assert "PASS" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and set(report["models"]) == {"base", "sft"}
    adapter, base = report["models"]["sft"], report["models"]["base"]
    assert adapter["n"] == 40 and adapter["exact_match"] >= 0.5 and adapter["eos_rate"] >= 0.9
    assert base["exact_match"] < 0.1 and base["loss"] > adapter["loss"] + 1.0  # a gain is a gain
    assert adapter["general_loss"] is not None and base["general_loss"] is not None
    # exact match in report.json = a recount from the saved generations (same normalization, stated in report.md)
    from nemo_ft.eval import exact_match
    rows = read_jsonl(out / "generations.jsonl")
    assert len(rows) == 40
    for name in ("base", "sft"):
        recount = sum(exact_match(r[name]["text"], r["reference"]) for r in rows) / len(rows)
        assert recount == report["models"][name]["exact_match"], name
    assert rows[0]["reference"] == read_jsonl(trained / "prep" / "test.jsonl")[0]["output"]
    for png in ("metrics.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md.startswith("# Eval: PASS") and "| sft | min_exact_match" in md and "![loss curves]" in md
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "eval" and m["summary"]["passed"] is True
    assert {"report_md", "report_json", "generations", "metrics_png", "curves_png"} <= {r["role"] for r in m["outputs"]}


def test_base_alone_and_a_zero_adapter_fail_their_gates(trained, tmp_path):
    import torch

    from nemo_ft.nemo_archive import NemoArchive, write_adapter
    tp1 = trained / "export" / "adapter_tp1.nemo"
    with NemoArchive(tp1) as a:
        conf, state = a.config(), a.tensors()["model_weights.ckpt"]
    zero = write_adapter(tmp_path / "zero.nemo", conf, {k: torch.zeros_like(v) for k, v in state.items()})
    # two adapters on one base (same PEFT layout: their weights are swapped on the restored base)
    proc = _eval(tmp_path / "both", f"from_run={trained / 'export'}", f"adapters=['lookup={tp1}','zero={zero}']",
                 check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "zero: min_loss_improvement" in proc.stderr and "zero: min_exact_match" in proc.stderr
    assert "lookup:" not in proc.stderr.split("gate(s) failed", 1)[1]  # the trained one passed
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert report["models"]["zero"]["loss"] == pytest.approx(report["models"]["base"]["loss"], abs=1e-5)
    assert report["models"]["lookup"]["exact_match"] >= 0.5
    # the base alone (no adapter) is judged against itself: no gain, and it cannot answer
    proc = _eval(tmp_path / "base", f"base={REPO / 'data/tiny/tiny_llama.nemo'}",
                 f"eval.test_file={trained / 'prep/test.jsonl'}", f"eval.general_file={trained / 'prep/general.jsonl'}",
                 check=False)
    assert proc.returncode == 3 and "base: min_loss_improvement" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "base" / "report.json").read_text())["passed"] is False


def test_cached_generation_equals_the_no_cache_loop_with_the_adapter_on(trained, tmp_path):
    prompts = tiny_token_ids([r["input"] for r in read_jsonl(trained / "prep" / "test.jsonl")[:12]])
    adapter = trained / "export" / "adapter_tp1.nemo"
    cached = model_probe(tmp_path, REPO / "data/tiny/tiny_llama.nemo", "greedy", prompts, adapter=adapter)
    loop = model_probe(tmp_path, REPO / "data/tiny/tiny_llama.nemo", "nocache", prompts, adapter=adapter)
    assert [g["ids"] for g in cached["generations"]] == [g["ids"] for g in loop["generations"]]
    assert all(g["ended_with_eos"] for g in cached["generations"]) and any(g["ids"] for g in cached["generations"])




def test_bad_inputs_are_exit_2_before_any_model_is_built(trained, tmp_path):
    import sentencepiece as spm

    adapter = trained / "export" / "adapter_tp1.nemo"
    corrupt = tmp_path / "corrupt.nemo"
    corrupt.write_bytes(adapter.read_bytes()[:1000])
    assert_refused(_eval(tmp_path / "a", f"from_run={trained / 'export'}", f"adapters=['c={corrupt}']", check=False),
             str(corrupt), "adapters[c]")
    # a test split prepared with another tokenizer than the base's
    spm.SentencePieceTrainer.train(input=str(SAMPLE / "pretrain.txt"), model_prefix=str(tmp_path / "other"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    run_stage("prep", f"input={SAMPLE / 'lookup_train.jsonl'}", f"out_dir={tmp_path / 'other_prep'}",
              f"tokenizer.model={tmp_path / 'other.model'}", "split.train=0.8", "split.validation=0.1", "split.test=0.1",
              "progress=false", "template.prompt_template='{input}{output}'")
    assert_refused(_eval(tmp_path / "b", f"from_run={trained / 'export'}", f"eval.test_file={tmp_path / 'other_prep/test.jsonl'}",
                   check=False), "prepared with another tokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_refused(_eval(tmp_path / "c", f"from_run={trained / 'export'}", f"eval.test_file={empty}", check=False),
             f"{empty}: eval.test_file: is empty")
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "nemo").exists()  # no trainer, no model
