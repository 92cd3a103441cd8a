"""`nemo-ft import`: a Hugging Face Llama built here -> a base .nemo with transformers' logits, that export
turns back into the same tensors and SFT trains on. Logits within 1e-4 (fp32; measured ~4e-6)."""
import json
import shutil

import pytest

from tests.conftest import TOKENIZER, max_abs_diff, model_probe, read_metrics, run_stage

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random-init HF Llama (GQA 4 heads / 2 kv heads, head_dim 32), weights large enough that a
    q/k/v or gate/up mixup would show, with the tiny SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    d = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(d, safe_serialization=True)
    LlamaTokenizer(vocab_file=TOKENIZER, legacy=True, add_bos_token=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "base.nemo"
    run_stage("import_hf", f"hf={hf_llama}", f"out={out}", f"run.dir={out.parent / 'run'}", "profile=tiny")
    return out


def test_imported_base_has_transformers_logits(hf_llama, imported, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    m = json.loads((imported.parent / "run" / "manifest.json").read_text())
    assert m["stage"] == "import" and m["summary"]["checks"]["nemo_vs_transformers_logits"] < 1e-4
    ids = [[5, 17, 300, 42, 99, 7, 250, 3], [100, 200, 300, 400, 500, 11, 12, 13]]
    nemo = model_probe(tmp_path, imported, "logits", ids)["logits"]
    hf = LlamaForCausalLM.from_pretrained(hf_llama)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.tolist()
    assert max_abs_diff(nemo, theirs) < 1e-4
    assert max(abs(v) for seq in nemo for row in seq for v in row) > 1.0  # large logits: a q/k/v swap would show


def test_export_of_the_imported_base_gives_the_original_tensors_back(hf_llama, imported, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "export"
    run_stage("export", f"base={imported}", f"out_dir={out}")
    original = load_file(hf_llama / "model.safetensors")
    exported = load_file(out / "hf_base" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for key, t in original.items():
        assert torch.equal(exported[key], t), key  # bit for bit
    config = json.loads((out / "hf_base" / "config.json").read_text())
    assert (config["head_dim"], config["num_key_value_heads"], config["vocab_size"]) == (32, 2, 512)


def test_sft_trains_on_the_imported_base(imported, tmp_path):
    run_stage("sft", f"run.dir={tmp_path}", f"model.restore_from_path={imported}", "trainer.max_steps=10",
              "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", "model.optim.lr=3e-3")
    train, _ = read_metrics(tmp_path)
    assert train[-1]["reduced_train_loss"] < train[0]["reduced_train_loss"] - 0.5, train


@pytest.mark.parametrize("change,field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": 640}, "vocab_size"),
])
def test_unsupported_architecture_is_refused_naming_the_field(hf_llama, tmp_path, change, field):
    bad = tmp_path / "hf"
    shutil.copytree(hf_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_stage("import_hf", f"hf={bad}", f"out={tmp_path / 'x.nemo'}", f"run.dir={tmp_path / 'run'}",
                     check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{field}: " in proc.stderr, proc.stderr
    assert not (tmp_path / "x.nemo").exists()


def test_shape_that_does_not_fit_the_profile_is_refused(hf_llama, tmp_path):
    proc = run_stage("import_hf", f"hf={hf_llama}", f"out={tmp_path / 'x.nemo'}", f"run.dir={tmp_path / 'run'}",
                     "profile=llama3_8b", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.hidden_size: conf/model/llama3_8b.yaml says 4096 but the HF checkpoint has 128" in proc.stderr
    assert not (tmp_path / "x.nemo").exists()
