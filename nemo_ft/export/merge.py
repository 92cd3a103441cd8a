"""Fold a TP=1 NeMo LoRA adapter into the NeMo base weights: W' = W + (alpha / r) * B @ A, in float32.

The scale is the one NeMo's LoRA forward applies (parallel_adapters.py 358: x * (self.alpha / self.dim));
NeMo 1.x's scripts/nlp_language_modeling/merge_lora_weights/merge.py adds B @ A without it, which is
right only when alpha == adapter_dim. Both the adapter and the base are TP=1 (gather first): the
adapter's fc1 B is then [gate; up] like linear_fc1, and qkv B has linear_qkv's per-group row order, so
the delta lines up with the base weight row for row.

float32 is enough: B @ A has rank r and its terms are products of two bf16-origin values; the
result is cast back to the base dtype by the caller anyway.
"""
from __future__ import annotations

import numpy as np

from nemo_ft.errors import ConfigError, InputError
from nemo_ft.peft import LORA_MODULES
from nemo_ft.export.layout import check_adapter, lora_key, lora_shapes
from nemo_ft.export.spec import AdapterSpec


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale * B @ A in float32: A [r, in], B [out, r] -> [out, in]."""
    return np.float32(scale) * (b.astype(np.float32) @ a.astype(np.float32))


def base_key(base: dict, layer: int, target: str) -> str:
    """The base weight a LoRA target adapts, spelled the way `base` spells its keys (with or without model.)."""
    name = f"decoder.layers.{layer}.{LORA_MODULES[target][1]}.weight"
    if f"model.{name}" in base:
        return f"model.{name}"
    if name in base:
        return name
    raise InputError(f"base weight for LoRA target {target} of layer {layer} not found "
                     f"(looked for model.{name} and {name})", key=f"model.{name}")


def merge_lora(base: dict, adapter: dict, spec: AdapterSpec) -> dict:
    """A copy of `base` with every LoRA-adapted weight replaced by its merged float32 value.

    base: NeMo base state {key: array} (TP=1). adapter: TP=1 LoRA {key: array} (gather_adapter's output).
    Unadapted entries are passed through as the same objects; merged ones are new float32 arrays.
    """
    if not spec.has_lora:
        raise ConfigError("model.peft.peft_scheme", f"{','.join(spec.schemes)}: only LoRA merges into base weights")
    others = [s for s in spec.schemes if s not in ("lora", "qlora")]
    if others:
        raise ConfigError("model.peft.peft_scheme", f"{','.join(spec.schemes)}: {', '.join(others)} cannot be "
                          "merged into base weights; export the adapter instead")
    check_adapter(adapter, spec)
    merged = dict(base)
    for layer in spec.layers_of("lora"):
        for target in spec.targets:
            key = base_key(base, layer, target)
            a, b = adapter[lora_key(layer, target, "A")], adapter[lora_key(layer, target, "B")]
            want = (lora_shapes(spec, target)[1][0], lora_shapes(spec, target)[0][1])
            w = base[key]
            if tuple(w.shape) != want:
                raise InputError(f"base weight shape {tuple(w.shape)}, expected {want} for {target} "
                                 "(a TP=1 base of this config)", key=key)
            merged[key] = w.astype(np.float32) + lora_delta(a, b, spec.scale)
    return merged
