"""NeMo's PEFT vocabulary, once: the schemes nemo-ft runs and the LoRA targets with their module names.

Pure Python. The names are NeMo 2.4's (nemo/collections/nlp/parts/peft_config.py: PEFT_CONFIG_MAP,
PEFT_MODULE_MAP, LoraPEFTConfig); tests/nemo checks them against the installed NeMo.
"""
from __future__ import annotations

from nemo_ft.errors import ConfigError

# Keys of NeMo's PEFT_CONFIG_MAP that nemo-ft configures (conf/peft/), "none" = full fine-tuning.
PEFT_SCHEMES = ("none", "lora", "qlora", "ia3", "adapter", "ptuning", "selective")
# The four LoRA targets of a Megatron GPT layer, in NeMo's order.
LORA_TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
# NeMo's shorthands (PEFT_MODULE_MAP "attention", "mlp", "all").
LORA_TARGET_GROUPS = {"attention": LORA_TARGETS[:2], "mlp": LORA_TARGETS[2:], "all": LORA_TARGETS}
# target -> (adapter module under model.decoder.layers.N., the base linear it adapts, TP split kind).
# Column-parallel linears split their output across TP ranks, row-parallel ones their input.
LORA_MODULES = {
    "attention_qkv": ("self_attention.adapter_layer.lora_kqv_adapter", "self_attention.linear_qkv", "column"),
    "attention_dense": ("self_attention.adapter_layer.lora_dense_attention_adapter", "self_attention.linear_proj", "row"),
    "mlp_fc1": ("mlp.adapter_layer.lora_hto4h_adapter", "mlp.linear_fc1", "column"),
    "mlp_fc2": ("mlp.adapter_layer.lora_4htoh_adapter", "mlp.linear_fc2", "row"),
}
# Activations whose fc1 is [gate; up] fused, for which NeMo's LoRA doubles the fc1 adapter width.
FAST_GATED = ("fast-swiglu", "fast-geglu", "fast-reglu")


def schemes_of(scheme: str) -> list[str]:
    """NeMo allows combined schemes ("ptuning,lora"); each part must be known."""
    parts = [s.strip().lower() for s in str(scheme).split(",")]
    for s in parts:
        if s not in PEFT_SCHEMES:
            raise ConfigError("model.peft.peft_scheme", f"unknown scheme {s!r}; expected one of {', '.join(PEFT_SCHEMES)}")
    return parts


def lora_targets(names) -> list[str]:
    """NeMo's get_target_modules: expand attention / mlp / all, keep order, drop repeats."""
    out: list[str] = []
    for name in list(names or []):
        for target in LORA_TARGET_GROUPS.get(name, (name,)):
            if target not in LORA_TARGETS:
                raise ConfigError("model.peft.lora_tuning.target_modules",
                                  f"{target!r} is not one of {', '.join(LORA_TARGETS + tuple(LORA_TARGET_GROUPS))}")
            if target not in out:
                out.append(target)
    if not out:
        raise ConfigError("model.peft.lora_tuning.target_modules",
                          f"empty; expected some of {', '.join(LORA_TARGETS + tuple(LORA_TARGET_GROUPS))}")
    return out
