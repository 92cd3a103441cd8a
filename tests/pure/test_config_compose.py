"""Shared config groups (trainer, exp_manager, run) changed no composed value: each stage's config is
what it was before they existed, key for key (golden/ was written from the configs of 2026-12-01)."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nemo_ft.config  # noqa: F401  (registers ${repo:})
from nemo_ft.paths import CONF_DIR

GOLDEN = Path(__file__).parent / "golden"
# Keys added or changed on purpose since the golden files were written: {key: value}.
ADDED = {"run.trust_checkpoint": False,  # #9: accept a trusted .nemo's pickles
         "model.hidden_size": 128, "model.ffn_hidden_size": 344}  # #10: the tiny base rebuilt at head_dim 32
ADDED_TO = {"sft_lora": {"run.allow_repeat": False,  # #13: refuse data smaller than one batch unless told
                         "run.loss_per_token": True}}  # #13: one loss for any DP/accumulation


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("config,overrides,golden", [
    ("sft_lora", [], "sft.yaml"),
    ("sft_lora", ["parallel=cpu_tp2", "peft=ia3"], "sft_tp2_ia3.yaml"),
    ("sft_lora", ["data=chat"], "sft_chat.yaml"),
    ("base", [], "base.yaml"),
])
def test_composed_config_is_unchanged_key_for_key(config, overrides, golden):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = OmegaConf.to_container(compose(config, overrides=overrides))  # unresolved, as --cfg job prints
    want = flat(yaml.safe_load((GOLDEN / golden).read_text()))
    got = flat(cfg)
    added = {**ADDED, **ADDED_TO.get(config, {})}
    assert {k: got[k] for k in added if k in got} == added
    got = {k: v for k, v in got.items() if k not in added}
    want = {k: v for k, v in want.items() if k not in added}
    assert got == want, {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
