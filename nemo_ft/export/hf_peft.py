"""A TP=1 NeMo LoRA adapter as a Hugging Face PEFT LoRA for the HF Llama export of the same base (no merge).

NeMo fuses what HF keeps apart, so the fused adapters are unfused exactly, as NeMo's own exporters do
(nemo/export/utils/lora_converter.py convert_lora_weights_to_canonical, NeMo 2's HFLlamaPEFTExporter):
- attention_qkv: A feeds q, k and v alike, so q_proj, k_proj and v_proj each get a copy of A; B's rows
  are split per query group into q/k/v rows (hf_llama.split_qkv), so each B_x @ A is exactly the q/k/v
  rows of the fused B @ A.
- mlp_fc1: A copied to gate_proj and up_proj; B's halves are gate and up.
- attention_dense -> o_proj, mlp_fc2 -> down_proj, unchanged.
peft scales by lora_alpha / r (use_rslora false), NeMo by alpha / adapter_dim: r = adapter_dim and
lora_alpha = alpha give the same delta. Keys are peft's on-disk names (peft inserts the adapter name
when loading): base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight; A is [r, in], B [out, r].
lora_dropout is copied, but NeMo's default dropout_position is "post" (on the adapter output) while
peft drops the adapter input: equal at inference, not for further training.
"""
from __future__ import annotations

from nemo_ft.errors import ConfigError
from nemo_ft.export.hf_llama import split_fc1, split_qkv
from nemo_ft.export.layout import check_adapter, lora_key, lora_shapes
from nemo_ft.export.spec import AdapterSpec

# NeMo target -> HF Llama module names (under model.layers.N.)
HF_LORA_MODULES = {
    "attention_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention_dense": ("self_attn.o_proj",),
    "mlp_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_fc2": ("mlp.down_proj",),
}
HF_PEFT_PREFIX = "base_model.model.model.layers."


def _check(spec: AdapterSpec) -> None:
    if not spec.has_lora or any(s not in ("lora", "qlora") for s in spec.schemes):
        raise ConfigError("model.peft.peft_scheme", f"{','.join(spec.schemes)}: only a LoRA-only adapter maps to "
                          "HF PEFT LoRA")
    if "mlp_fc1" in spec.targets and not spec.model.gated:
        raise ConfigError("model.activation", f"{spec.model.activation!r}: HF Llama's MLP is gated")


def lora_to_hf_peft(adapter: dict, spec: AdapterSpec) -> dict:
    """HF PEFT tensors {key: array} (adapter_model.safetensors content) from a TP=1 NeMo LoRA adapter."""
    _check(spec)
    check_adapter(adapter, spec)
    out = {}
    for layer in spec.layers_of("lora"):
        for target in spec.targets:
            a, b = adapter[lora_key(layer, target, "A")], adapter[lora_key(layer, target, "B")]
            if target == "attention_qkv":
                b_parts = split_qkv(b, spec.model)
            elif target == "mlp_fc1":
                b_parts = split_fc1(b, spec.model)
            else:
                b_parts = (b,)
            for module, b_part in zip(HF_LORA_MODULES[target], b_parts):
                base = f"{HF_PEFT_PREFIX}{layer}.{module}"
                out[f"{base}.lora_A.weight"] = a  # shared A: the same array for each unfused module
                out[f"{base}.lora_B.weight"] = b_part
    return out


def hf_peft_shapes(spec: AdapterSpec) -> dict:
    """{key: shape} of the tensors lora_to_hf_peft writes for this spec: what a server loading the HF-PEFT
    adapter onto the spec's base will expect (A [r, in] per unfused module, B [its rows, r])."""
    _check(spec)
    m, r = spec.model, spec.adapter_dim
    out = {}
    for layer in spec.layers_of("lora"):
        for target in spec.targets:
            a_shape, b_shape = lora_shapes(spec, target)
            rows = {"attention_qkv": (m.q_size, m.kv_size, m.kv_size),
                    "mlp_fc1": (m.ffn_hidden_size, m.ffn_hidden_size)}.get(target, (b_shape[0],))
            for module, n in zip(HF_LORA_MODULES[target], rows):
                out[f"{HF_PEFT_PREFIX}{layer}.{module}.lora_A.weight"] = a_shape
                out[f"{HF_PEFT_PREFIX}{layer}.{module}.lora_B.weight"] = (n, r)
    return out


def hf_target_modules(spec: AdapterSpec) -> list:
    return [m.split(".")[-1] for t in spec.targets for m in HF_LORA_MODULES[t]]


def hf_peft_adapter_config(spec: AdapterSpec, base_model_name_or_path: str) -> dict:
    """adapter_config.json for lora_to_hf_peft's tensors."""
    _check(spec)
    layers = spec.layers_of("lora")
    partial = layers != list(range(spec.model.num_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.adapter_dim,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": hf_target_modules(spec),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        # layer_selection: without these peft adds LoRA modules to every layer and warns that the
        # unselected layers' weights are missing.
        "layers_to_transform": layers if partial else None,
        "layers_pattern": "layers" if partial else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
