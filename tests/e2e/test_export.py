"""`nemo-ft export` on adapters trained here: every output loads in the tool it is for and computes the same.

Tolerances (fp32 on CPU): logits within 1e-4 absolute (logits are O(10); measured differences are
2e-6..6e-6, the summation-order noise of fp32 matmuls), validation losses within 1e-5 (measured 1e-7),
generated tokens equal exactly. The adapters train LoRA on all four targets with alpha != adapter_dim,
so the fc1 [gate; up] regrouping, the GQA qkv split and the alpha/r scale are all exercised.
"""
import io
import json
import tarfile

import pytest

from tests.conftest import REPO, max_abs_diff, model_probe, read_jsonl, read_metrics, run_stage, tiny_token_ids

pytestmark = pytest.mark.e2e

LORA_ALL = ("model.peft.lora_tuning.target_modules=[all]", "model.peft.lora_tuning.adapter_dim=8",
            "model.peft.lora_tuning.alpha=16")
FAST = ("trainer.enable_progress_bar=false", "trainer.val_check_interval=10")
TOL = 1e-4
BASE = REPO / "data" / "tiny" / "tiny_llama.nemo"
PROMPTS = ["Question: What is the capital of Peru?\nAnswer:", "What is 7 plus 2?", "Name: Italy. Town: Lima.\nTown?",
           "The capital of France is"]


def _train(tmp_path_factory, name, parallel="cpu", nproc=1, steps=20, extra=()):
    run_dir = tmp_path_factory.mktemp(name)
    run_stage("sft", f"run.dir={run_dir}", f"parallel={parallel}", *LORA_ALL, *FAST, f"trainer.max_steps={steps}",
              *extra, nproc=nproc)
    return run_dir


def _export(run_dir, out, *extra, check=True):
    return run_stage("export", f"from_run={run_dir}", f"out_dir={out}", *extra, check=check, timeout=300)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return _train(tmp_path_factory, "lora_tp1", steps=30)


@pytest.fixture(scope="module")
def exported(tp1, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tp1"
    _export(tp1, out, "merge=true")
    return out


def _ids(prompts=PROMPTS):
    return tiny_token_ids(prompts)


def test_export_writes_every_layout_with_a_manifest(exported, tp1):
    m = json.loads((exported / "manifest.json").read_text())
    roles = {r["role"] for r in m["outputs"]}
    assert {"adapter_tp1", "nim_nemo", "nim_hf", "hf_base", "hf_peft", "merged_nemo", "merged_hf", "serving_md"} <= roles
    s = m["summary"]
    assert (s["rank"], s["alpha"], s["trained_tp"], s["trained_pp"]) == (8, 16.0, 1, 1)
    assert s["targets"] == ["attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"]
    assert {r["role"] for r in m["inputs"]} == {"adapter", "base"}
    name = tp1.name
    assert (exported / "nim" / name / f"{name}.nemo").read_bytes() == (exported / "adapter_tp1.nemo").read_bytes()
    assert sorted(p.name for p in (exported / "nim" / f"{name}-hf").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    serving = (exported / "serving.md").read_text()
    assert "deploy_triton.py" in serving and "--lora_ckpt" in serving and "NIM_PEFT_SOURCE" in serving
    assert f"--lora-modules {name}=" in serving and "TensorRT-LLM's NeMo LoRA loader reads only" in serving
    assert not list(exported.parent.glob(".*partial"))


def test_merged_nemo_equals_base_plus_adapter(exported, tmp_path):
    ids = _ids()
    unmerged = model_probe(tmp_path, BASE, "logits", ids, adapter=exported / "adapter_tp1.nemo")["logits"]
    merged = model_probe(tmp_path, exported / "merged" / "merged.nemo", "logits", ids)["logits"]
    base = model_probe(tmp_path, BASE, "logits", ids)["logits"]
    assert max_abs_diff(merged, unmerged) < TOL
    assert max_abs_diff(base, unmerged) > 0.5  # the adapter matters: the check above can fail


def test_hugging_face_outputs_equal_nemo(exported, tmp_path):
    import logging

    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = _ids()
    nemo_base = model_probe(tmp_path, BASE, "logits", ids)["logits"]
    nemo_lora = model_probe(tmp_path, BASE, "logits", ids, adapter=exported / "adapter_tp1.nemo")["logits"]
    hf, info = LlamaForCausalLM.from_pretrained(exported / "hf_base", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    merged, info = LlamaForCausalLM.from_pretrained(exported / "merged" / "merged_hf", output_loading_info=True)
    assert not any(info.values()), info

    def logits(model):
        with torch.no_grad():
            return [model(input_ids=torch.tensor([p])).logits[0].tolist() for p in ids]
    assert max_abs_diff(logits(hf), nemo_base) < TOL
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("peft").addHandler(handler)
    lora = PeftModel.from_pretrained(hf, exported / "hf_peft")
    assert not [r for r in records if "missing" in r.getMessage().lower()], [r.getMessage() for r in records]
    from safetensors.torch import load_file
    saved = load_file(exported / "hf_peft" / "adapter_model.safetensors")
    params = dict(lora.named_parameters())
    for key, t in saved.items():  # every saved tensor is the one peft uses
        live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[live], t), key
    assert max_abs_diff(logits(lora), nemo_lora) < TOL
    assert max_abs_diff(logits(merged), nemo_lora) < TOL


def test_hf_tokenizer_encodes_as_nemo_does(exported):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(REPO / "data" / "tiny" / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(exported / "hf_base")
    assert type(hf).__name__ == "LlamaTokenizerFast"  # what vLLM loads
    texts = PROMPTS + [r[k] for f in ("sft_train.jsonl", "sft_validation.jsonl")
                       for r in read_jsonl(REPO / "data" / "sample" / f) for k in ("input", "output")]
    assert len(texts) > 100
    assert [hf(t)["input_ids"] for t in texts] == [sp.encode(t) for t in texts]


def test_greedy_generation_hf_equals_nemo(exported, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = _ids()
    nemo = model_probe(tmp_path, BASE, "greedy", ids, adapter=exported / "adapter_tp1.nemo", max_new=16)["generations"]
    lora = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(exported / "hf_base"), exported / "hf_peft")
    for p, g in zip(ids, nemo):
        out = lora.generate(input_ids=torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=2,
                            pad_token_id=2)[0, len(p):].tolist()
        out = out[:out.index(2)] if 2 in out else out
        assert out == g["ids"], (p, out, g)
    assert any(g["ids"] for g in nemo)  # something was generated


# ------------------------------------------------------------------------------------------- layouts

LAYOUTS = {"tp2": ("cpu_tp2", 2), "pp2": ("cpu_pp2", 2), "tp2_pp2": ("cpu_tp2_pp2", 4)}


@pytest.fixture(scope="module")
def trained_at(tmp_path_factory):
    """layout -> the run dir of an adapter trained at it (10 steps, validated at step 10), trained on
    first use: the layout test and the bad-input test share the TP=2 one."""
    runs = {}

    def get(layout):
        if layout not in runs:
            parallel, nproc = LAYOUTS[layout]
            runs[layout] = _train(tmp_path_factory, f"lora_{layout}", parallel=parallel, nproc=nproc, steps=10)
        return runs[layout]
    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adapter_from_any_layout_exports_to_the_same_model_at_tp1(layout, trained_at, tmp_path):
    parallel, nproc = LAYOUTS[layout]
    run_dir = trained_at(layout)
    out = tmp_path / "export"
    _export(run_dir, out)
    s = json.loads((out / "manifest.json").read_text())["summary"]
    tp, pp = {"tp2": (2, 1), "pp2": (1, 2), "tp2_pp2": (2, 2)}[layout]
    assert (s["trained_tp"], s["trained_pp"]) == (tp, pp)
    with tarfile.open(out / "adapter_tp1.nemo") as tar:
        assert sorted(n.lstrip("./") for n in tar.getnames() if n.endswith(".ckpt")) == ["model_weights.ckpt"]

    def val_loss(*args, nproc=1):
        proc = run_stage("sft", f"run.dir={tmp_path / ('val_' + str(nproc))}", "run.validate_only=true", *LORA_ALL,
                         "trainer.enable_progress_bar=false", *args, nproc=nproc)
        return float([ln for ln in proc.stdout.splitlines() if "validation loss of base +" in ln][-1].rsplit(":", 1)[1])
    trained = read_metrics(run_dir)[1][-1]["val_loss"]  # the final adapter's, in the layout it was trained in
    at_tp1 = val_loss(f"model.peft.restore_from_path={out / 'adapter_tp1.nemo'}")
    assert at_tp1 == pytest.approx(trained, abs=1e-5)
    if layout != "tp2":  # and the sharded adapter restores in its own layout (TP=2's round trip: test_sft)
        assert val_loss(f"parallel={parallel}", f"model.peft.restore_from_path={run_dir / 'adapter.nemo'}",
                        nproc=nproc) == pytest.approx(trained, abs=1e-5)
    if layout == "tp2":  # the logits themselves, gathered over the two TP ranks
        ids = _ids()[:2]
        a = model_probe(tmp_path, BASE, "logits", ids, adapter=run_dir / "adapter.nemo", parallel=parallel, nproc=2)["logits"]
        b = model_probe(tmp_path, BASE, "logits", ids, adapter=out / "adapter_tp1.nemo")["logits"]
        assert max_abs_diff(a, b) < TOL


# --------------------------------------------------------------------------------- other PEFT schemes

@pytest.mark.parametrize("scheme", ["ia3", "adapter", "ptuning"])
def test_non_lora_schemes_export_their_tp1_nemo_and_refuse_hf_and_merge(scheme, tmp_path):
    run_dir = tmp_path / "run"
    run_stage("sft", f"run.dir={run_dir}", f"peft={scheme}", "trainer.enable_progress_bar=false",
              "trainer.max_steps=4", "trainer.val_check_interval=4")
    _export(run_dir, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["summary"]["hf"] is False and "not LoRA" in m["summary"]["hf_skipped"]
    assert m["summary"]["checks"]["nemo_restores_adapter_tp1"]["equal"] is True
    assert (tmp_path / "out" / "adapter_tp1.nemo").exists() and not (tmp_path / "out" / "hf_peft").exists()
    for flag in ("hf=true", "merge=true"):
        proc = _export(run_dir, tmp_path / flag.split("=")[0], flag, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "is not LoRA" in proc.stderr and "only for LoRA" in proc.stderr, proc.stderr
        assert not (tmp_path / flag.split("=")[0]).exists()


# ------------------------------------------------------------------------------------------ bad inputs

def _retar(src, dst, replace=None, drop=()):
    replace = replace or {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name in drop or any(name.startswith(d + "/") for d in drop):
                continue
            data = replace.get(name, tin.extractfile(m).read() if m.isfile() else None)
            if data is not None:
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return dst


def _edited_config(src, **changes):
    import yaml
    with tarfile.open(src) as tar:
        conf = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    for key, value in changes.items():
        node = conf
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return yaml.safe_dump(conf).encode()


def _refused(tmp_path, out, args, words):
    proc = run_stage("export", f"out_dir={out}", *args, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert not list(out.parent.glob(f".{out.name}.partial"))
    return proc


def test_bad_inputs_are_clear_errors_with_nothing_left_behind(tp1, trained_at, tmp_path):
    adapter, out, tp2 = tp1 / "adapter.nemo", tmp_path / "out", trained_at("tp2")
    other_base = _retar(BASE, tmp_path / "other_base.nemo", {"model_config.yaml": _edited_config(BASE, hidden_size=64)})
    _refused(tmp_path, out, [f"adapter={adapter}", f"base={other_base}"],
             ["trained on another base", "hidden_size is 128", "other_base.nemo has 64"])
    _refused(tmp_path, out, [f"adapter={adapter}", "base=/nonexistent/base.nemo"], ["base: file not found"])
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    _refused(tmp_path, out, [f"adapter={truncated}", f"base={BASE}"], [str(truncated), "adapter: "])
    no_rank1 = _retar(tp2 / "adapter.nemo", tmp_path / "no_rank1.nemo", drop=("mp_rank_01",))
    _refused(tmp_path, out, [f"adapter={no_rank1}", f"base={BASE}"], ["missing the weights of rank(s) ['mp_rank_01']"])
    odd_rank = _retar(tp2 / "adapter.nemo", tmp_path / "odd_rank.nemo",
                      {"model_config.yaml": _edited_config(tp2 / "adapter.nemo", **{"peft.lora_tuning.adapter_dim": 7})})
    _refused(tmp_path, out, [f"adapter={odd_rank}", f"base={BASE}"],
             [f"{odd_rank}: model.peft.lora_tuning.adapter_dim: 7 is not divisible by tensor_model_parallel_size=2"])
    assert not out.exists()


def test_out_dir_holding_an_export_is_replaced_only_with_overwrite(tp1, tmp_path):
    out = tmp_path / "out"
    _export(tp1, out)
    first = (out / "manifest.json").read_text()
    _refused(tmp_path, out, [f"from_run={tp1}"], ["already holds an export", "overwrite=true"])
    assert (out / "manifest.json").read_text() == first  # untouched
    _export(tp1, out, "overwrite=true")
    assert (out / "manifest.json").read_text() != first
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    _refused(tmp_path, tmp_path / "notes", [f"from_run={tp1}", "overwrite=true"], ["not an export"])
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_a_failed_check_leaves_no_partial_output(tp1, tmp_path):
    out = tmp_path / "out"
    proc = run_stage("export", f"from_run={tp1}", f"out_dir={out}", "merge=true", "tolerance=0", check=False,
                     timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "not equivalent" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial"))
