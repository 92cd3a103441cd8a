"""Bad SFT configs end with one readable message naming the key, exit 2, no traceback, no model built."""
import pytest

from tests.conftest import REPO, run_stage, tiny_base_config

CASES = [
    # (overrides, key the message must name, words it must contain)
    (["model.tensor_model_parallel_size=3", "trainer.devices=3"], "model.tensor_model_parallel_size",
     "does not divide num_attention_heads=4"),
    (["parallel=cpu_tp2"], "trainer.devices", "launcher"),  # tp2 profile wants 2 ranks, none launched
    (["model.global_batch_size=6"], "model.global_batch_size", "multiple of micro_batch_size"),
    (["trainer.max_steps=-5"], "trainer.max_steps", "-5 must be a whole number of optimizer steps >= 1"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", "0 must be a step count >= 1"),
    (["model.optim.name=distributed_fused_adam"], "model.optim.name", "PEFT"),
    (["model.data.train_ds.file_names=[/nonexistent/train.jsonl]"], "model.data.train_ds.file_names",
     "file not found: /nonexistent/train.jsonl"),
    (["model.restore_from_path=/nonexistent/base.nemo"], "model.restore_from_path", "file not found"),
    (["model.peft.lora_tuning.target_modules=[attention_qkv,q_proj]"], "model.peft.lora_tuning.target_modules",
     "q_proj"),
    (["model.hidden_size=4096"], "model.hidden_size", f"was built with {tiny_base_config()['hidden_size']}"),
    (["model.pipeline_model_parallel_size=3", "trainer.devices=3"], "model.pipeline_model_parallel_size",
     "does not divide num_layers=2"),
    (["model.data.train_ds.packed_sequence=true"], "model.micro_batch_size", "micro_batch_size=1"),
    (["model.data.train_ds.prompt_template='{output} {input}'"], "model.data.train_ds.prompt_template",
     "must end with the label"),
    (["peft=qlora"], "model.peft.peft_scheme", "NGC container"),
    (["model.optim.name=fused_adam"], "model.optim.name", "needs NVIDIA apex"),
    (["model.megatron_amp_O2=true"], "model.megatron_amp_O2", "needs NVIDIA apex"),
    (["model.sequence_parallel=true"], "model.sequence_parallel", "needs TP > 1"),
    (["model.activations_checkpoint_granularity=full"], "model.activations_checkpoint_method",
     "needs method uniform"),
    (["model.activations_checkpoint_granularity=full", "model.activations_checkpoint_method=block",
      "model.activations_checkpoint_num_layers=3"], "model.activations_checkpoint_num_layers",
     "1..2 (the layers per pipeline stage)"),
    (["model.activations_checkpoint_method=uniform"], "model.activations_checkpoint_granularity",
     "nothing would be checkpointed"),
    # an override naming no key, or no option of a group: the closest name, not Hydra's struct error
    (["model.peft.lora_tuning.adaptr_dim=8"], "model.peft.lora_tuning.adaptr_dim", "did you mean adapter_dim?"),
    (["parallel=cpu_tp3"], "parallel", "did you mean cpu_tp2?"),
]


@pytest.mark.parametrize("overrides,key,words", CASES, ids=[c[1] + ":" + c[0][0] for c in CASES])
def test_bad_config_is_one_clear_message(overrides, key, words, tmp_path):
    proc = run_stage("sft", f"run.dir={tmp_path}", *overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "config error" in proc.stderr and "nothing was started" in proc.stderr
    assert f"{key}:" in proc.stderr and words in proc.stderr, proc.stderr
    assert not (tmp_path / "nemo").exists()  # no trainer, no model


def test_composed_config_prints_with_overrides(tmp_path):
    proc = run_stage("sft", "--cfg", "job", "model.peft.lora_tuning.adapter_dim=32", "trainer.max_steps=50",
                     "parallel=cpu_tp2", check=True, timeout=60)
    assert "adapter_dim: 32" in proc.stdout and "max_steps: 50" in proc.stdout
    assert "tensor_model_parallel_size: 2" in proc.stdout and "peft_scheme: lora" in proc.stdout


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    """A real prep run on the sample data (its manifest is what sft checks)."""
    out = tmp_path_factory.mktemp("prep")
    run_stage("prep", "input=data/sample/sft_train.jsonl", f"out_dir={out}", "template.prompt_template='{input}{output}'",
              "split.train=0.8", "split.validation=0.2", "split.test=0", "seq_length=128", "progress=false")
    return out


def _copy_prep(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _prep_files(prep):
    return (f"model.data.train_ds.file_names=[{prep}/train.jsonl]",
            f"model.data.validation_ds.file_names=[{prep}/validation.jsonl]")


def test_data_prepared_for_another_tokenizer_or_template_is_refused(prepped, tmp_path):
    """A prep manifest whose tokenizer hash is not the base's (tampered here) and a template that differs."""
    import json

    prep = _copy_prep(prepped, tmp_path / "prep")
    m = json.loads((prep / "manifest.json").read_text())
    m["summary"]["tokenizer"]["sha256"] = "0" * 64
    (prep / "manifest.json").write_text(json.dumps(m))
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", *_prep_files(prep),
                     "model.data.train_ds.prompt_template='Q: {input}\nA: {output}'", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.data.train_ds.prompt_template: " in proc.stderr and "was prepared with prompt_template" in proc.stderr
    assert "model.data.train_ds.file_names: " in proc.stderr and "carries another tokenizer" in proc.stderr
    assert not (tmp_path / "run" / "nemo").exists()


def test_data_changed_after_prep_is_refused(prepped, tmp_path):
    prep = _copy_prep(prepped, tmp_path / "prep")
    with open(prep / "train.jsonl", "a") as f:
        f.write('{"input": "Q?", "output": " A."}\n')
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", *_prep_files(prep), check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{prep / 'manifest.json'}: " in proc.stderr and "train.jsonl changed after this prep run" in proc.stderr


def test_prepped_data_that_matches_passes_the_checks(prepped, tmp_path):
    from omegaconf import OmegaConf

    from nemo_ft.config.validate import check_prep_provenance
    cfg = OmegaConf.create({"model": {"restore_from_path": str(REPO / "data/tiny/tiny_llama.nemo"), "data": {
        "chat": False, "train_ds": {"file_names": [str(prepped / "train.jsonl")], "max_seq_length": 128,
                                    "prompt_template": "{input}{output}", "label_key": "output", "add_eos": True,
                                    "add_bos": False}}}})
    assert list(check_prep_provenance(cfg)) == []


def test_layout_that_cannot_fit_the_named_gpu_is_refused(tmp_path):
    proc = run_stage("sft", f"run.dir={tmp_path}", "plan.gpu={name: toy_0.5gb, memory_gb: 0.5}",
                     check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fits: NO" in proc.stderr and "does not fit" in proc.stderr and "plan.enforce=false" in proc.stderr
    assert "buffers" in proc.stderr and "capacity 0.50 GB" in proc.stderr  # the breakdown, not just a verdict
    assert not (tmp_path / "nemo").exists()


def test_checkpoint_built_with_transformer_engine_needs_it(tmp_path):
    import tarfile

    import yaml

    from nemo_ft.paths import REPO_ROOT
    src = REPO_ROOT / "data/tiny/tiny_llama.nemo"
    te_nemo = tmp_path / "te_base.nemo"
    with tarfile.open(src) as tin, tarfile.open(te_nemo, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("model_config.yaml"):
                conf = yaml.safe_load(data)
                conf["transformer_engine"] = True
                data = yaml.safe_dump(conf).encode()
                member.size = len(data)
            tout.addfile(member, __import__("io").BytesIO(data) if data is not None else None)
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", f"model.restore_from_path={te_nemo}", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.restore_from_path: te_base.nemo was built with Transformer Engine" in proc.stderr


def test_data_longer_than_max_seq_length_is_refused(prepped, tmp_path):
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", *_prep_files(prepped),
                     "model.data.train_ds.max_seq_length=16", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.data.train_ds.max_seq_length: " in proc.stderr and "would cut them silently" in proc.stderr


def test_data_smaller_than_one_batch_is_refused_unless_repeat_is_allowed(tmp_path):
    """NeMo's sampler repeats a train set smaller than the global batch without a word; validation with
    fewer rows than a micro batch runs no batch. Both are refused before any model is built."""
    import json

    row = json.dumps({"input": "Town: Oslo. Name: Peru.\nTown?", "output": " Oslo."}) + "\n"
    small = tmp_path / "one.jsonl"
    small.write_text(row * 3)
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", f"model.data.train_ds.file_names=[{small}]",
                     f"model.data.validation_ds.file_names=[{small}]", "model.micro_batch_size=4",
                     check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.data.train_ds.file_names: 3 row(s), fewer than one global batch (model.global_batch_size=8)" \
        in proc.stderr and "run.allow_repeat=true" in proc.stderr, proc.stderr
    assert "model.data.validation_ds.file_names: 3 row(s), fewer than one micro batch per data-parallel rank " \
           "(model.micro_batch_size x DP = 4 x 1)" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "nemo").exists()
    ok = run_stage("sft", f"run.dir={tmp_path / 'run'}", f"model.data.train_ds.file_names=[{small}]",
                   f"model.data.validation_ds.file_names=[{small}]", "run.allow_repeat=true", "run.validate_only=true",
                   "trainer.enable_progress_bar=false", check=False, timeout=300)
    assert ok.returncode == 0 and "validation loss of base" in ok.stdout, ok.stderr[-2000:]
