"""Config validation is pure Python: it answers before NeMo is imported."""
from omegaconf import OmegaConf

from nemo_ft.config.validate import fill_defaults, validate_sft
from nemo_ft.nemo_archive import read_config
from nemo_ft.paths import REPO_ROOT
from tests.conftest import tiny_base_config

TINY = tiny_base_config()


def _cfg(**model):
    base = {
        "trainer": {"devices": 1, "num_nodes": 1, "max_steps": 10, "val_check_interval": 20},
        "run": {"check_arch": True},
        "model": {
            "restore_from_path": str(REPO_ROOT / "data/tiny/tiny_llama.nemo"),
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            **{k: TINY[k] for k in ("num_attention_heads", "num_query_groups", "num_layers", "hidden_size")},
            "micro_batch_size": 4, "global_batch_size": 8, "max_position_embeddings": 128,
            "optim": {"name": "adam"},
            "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "target_modules": ["attention_qkv"]}},
            "data": {"train_ds": {"file_names": [str(REPO_ROOT / "data/sample/sft_train.jsonl")],
                                  "prompt_template": "{input}{output}", "label_key": "output", "max_seq_length": 128},
                     "validation_ds": {"file_names": [str(REPO_ROOT / "data/sample/sft_validation.jsonl")]}},
        },
    }
    cfg = OmegaConf.create(base)
    for k, v in model.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def keys(cfg):
    return [e.key for e in validate_sft(cfg)]


def test_good_config_has_no_errors():
    assert keys(_cfg()) == []


def test_each_bad_value_names_its_key():
    assert keys(_cfg(**{"trainer.devices": 3, "model.tensor_model_parallel_size": 3})) == [
        "trainer.devices", "model.tensor_model_parallel_size", "model.tensor_model_parallel_size"]
    assert "model.global_batch_size" in keys(_cfg(**{"model.global_batch_size": 6}))
    assert "model.num_layers" not in keys(_cfg())
    assert keys(_cfg(**{"model.hidden_size": TINY["hidden_size"] * 2})) == ["model.hidden_size"]
    assert keys(_cfg(**{"model.peft.lora_tuning.adapter_dim": 0})) == ["model.peft.lora_tuning.adapter_dim"]
    assert keys(_cfg(**{"model.data.train_ds.concat_sampling_probabilities": [0.5, 0.5]})) == [
        "model.data.train_ds.concat_sampling_probabilities"]


def test_fill_defaults_clamps_validation_interval_and_fills_probabilities():
    cfg = _cfg()
    notes = fill_defaults(cfg)
    assert cfg.trainer.val_check_interval == 10 and notes
    assert list(cfg.model.data.train_ds.concat_sampling_probabilities) == [1.0]


def test_reads_the_config_inside_a_nemo():
    conf = read_config(REPO_ROOT / "data/tiny/tiny_llama.nemo")
    assert conf["hidden_size"] == 128 and conf["num_query_groups"] == 2 and conf["activation"] == "fast-swiglu"
    assert conf["hidden_size"] // conf["num_attention_heads"] == 32  # head_dim vLLM's CPU attention serves
