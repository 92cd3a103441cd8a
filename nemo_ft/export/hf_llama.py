"""NeMo mcore GPT <-> Hugging Face LlamaForCausalLM: weight names and layouts, and config.json.

Weights (TP=1 state dicts of numpy arrays; pure permutations and slices, so both directions are exact):
- linear_qkv rows are grouped per query group as [q heads of the group..., k, v], each head_dim rows
  (mcore_mixins.py 164-203, megatron attention.py's own split): reshape to [groups, heads/group + 2, ...].
- linear_fc1 is [gate; up] halves (the GLU chunks the output in two, gate first: mcore_mixins.py 414-416).
- Norm names depend on the layer spec (megatron gpt_layer_specs.py get_gpt_layer_local_spec 280-302):
  the local spec has decoder.layers.N.input_layernorm / pre_mlp_layernorm, the Transformer Engine
  spec fuses them into self_attention.linear_qkv.layer_norm_weight / mlp.linear_fc1.layer_norm_weight.
  NeMo uses the local spec unless transformer_engine is true (megatron_gpt_model.py 155-158, 345, 386).
- Tied embeddings (share_embeddings_and_output_weights): no output_layer / lm_head.
RoPE: NeMo's default rotary_interleaved=false rotates halves, as HF Llama's rotate_half does.

config.json: HF LlamaConfig fields from NeMo's model_config.yaml, and back. Anything HF Llama cannot
express (biases, LayerNorm, partial or interleaved RoPE, an unknown RoPE scaling, ...) is refused with
a ConfigError naming the offending key, rather than exported as a model that loads and computes
something else.
"""
from __future__ import annotations

import re

import numpy as np

from nemo_ft.errors import ConfigError, InputError
from nemo_ft.export.spec import ModelSpec

HF_DTYPES = ("float32", "bfloat16", "float16")

# Per-layer names: our role -> (NeMo suffix after decoder.layers.N.)
_NEMO_LAYER = {
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}
_NEMO_NORMS = {
    # role -> (local spec name, Transformer Engine spec name)
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}
_HF_LAYER = {
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight", "input_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
}
_NEMO_GLOBAL = {"embed": "embedding.word_embeddings.weight", "final_norm": "decoder.final_layernorm.weight",
                "output": "output_layer.weight"}
_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "output": "lm_head.weight"}
# Present in some checkpoints, carry nothing a Llama needs: TE's fp8 metadata, a cached RoPE table.
_IGNORED = re.compile(r"(^|\.)_extra_state$|rotary_pos_emb\.inv_freq$|rotary_emb\.inv_freq$")
_NEMO_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- qkv / fc1

def split_qkv(w: np.ndarray, model: ModelSpec):
    """NeMo's fused qkv rows -> (q, k, v) in HF's head order. Works for a LoRA B too (any trailing dims)."""
    groups, per, hd = model.num_query_groups, model.heads_per_group, model.head_dim
    if w.shape[0] != model.qkv_size:
        raise InputError(f"linear_qkv has {w.shape[0]} rows, expected {model.qkv_size} "
                         f"(({model.num_attention_heads} + 2*{groups}) heads x {hd})")
    grouped = w.reshape((groups, per + 2, hd) + w.shape[1:])
    rest = w.shape[1:]
    q = grouped[:, :per].reshape((model.q_size,) + rest)
    k = grouped[:, per].reshape((model.kv_size,) + rest)
    v = grouped[:, per + 1].reshape((model.kv_size,) + rest)
    return np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, model: ModelSpec) -> np.ndarray:
    """HF q, k, v -> NeMo's fused qkv (the inverse of split_qkv)."""
    groups, per, hd = model.num_query_groups, model.heads_per_group, model.head_dim
    rest = q.shape[1:]
    for name, x, rows in (("q_proj", q, model.q_size), ("k_proj", k, model.kv_size), ("v_proj", v, model.kv_size)):
        if x.shape[0] != rows or x.shape[1:] != rest:
            raise InputError(f"{name} has shape {tuple(x.shape)}, expected ({rows}, ...) matching q_proj's columns")
    grouped = np.concatenate([q.reshape((groups, per, hd) + rest), k.reshape((groups, 1, hd) + rest),
                              v.reshape((groups, 1, hd) + rest)], axis=1)
    return np.ascontiguousarray(grouped.reshape((model.qkv_size,) + rest))


def split_fc1(w: np.ndarray, model: ModelSpec):
    """NeMo's gated linear_fc1 [gate; up] -> (gate, up)."""
    if not model.gated:
        raise ConfigError("model.activation", f"{model.activation!r} is not gated; HF Llama's MLP is SwiGLU")
    if w.shape[0] != model.fc1_size:
        raise InputError(f"linear_fc1 has {w.shape[0]} rows, expected {model.fc1_size} (2 x ffn_hidden_size)")
    half = model.ffn_hidden_size
    return np.ascontiguousarray(w[:half]), np.ascontiguousarray(w[half:])


# ---------------------------------------------------------------------------------------------- weights

def nemo_to_hf_llama(state: dict, model: ModelSpec) -> dict:
    """HF LlamaForCausalLM state {name: array} from a TP=1 NeMo base state (keys with or without `model.`)."""
    _check_llama_shape(model)
    roles = _read_nemo(state, model)
    out = {_HF_GLOBAL["embed"]: roles.pop(("embed", None)), _HF_GLOBAL["final_norm"]: roles.pop(("final_norm", None))}
    if ("output", None) in roles:
        out[_HF_GLOBAL["output"]] = roles.pop(("output", None))
    for layer in range(model.num_layers):
        q, k, v = split_qkv(roles[("qkv", layer)], model)
        gate, up = split_fc1(roles[("fc1", layer)], model)
        parts = {"q": q, "k": k, "v": v, "o": roles[("proj", layer)], "gate": gate, "up": up,
                 "down": roles[("fc2", layer)], "input_norm": roles[("input_norm", layer)],
                 "mlp_norm": roles[("mlp_norm", layer)]}
        for role, value in parts.items():
            out[f"model.layers.{layer}.{_HF_LAYER[role]}"] = value
    return out


def hf_to_nemo_llama(state: dict, model: ModelSpec, prefix: str = "model.") -> dict:
    """A TP=1 NeMo base state from an HF LlamaForCausalLM state; norm names follow model.transformer_engine."""
    _check_llama_shape(model)
    roles = _read_hf(state, model)
    norm_index = 1 if model.transformer_engine else 0
    out = {prefix + _NEMO_GLOBAL["embed"]: roles.pop(("embed", None))}
    for layer in range(model.num_layers):
        r = {role: roles[(role, layer)] for role in _HF_LAYER}
        base = f"{prefix}decoder.layers.{layer}."
        out[base + _NEMO_NORMS["input_norm"][norm_index]] = r["input_norm"]
        out[base + _NEMO_LAYER["qkv"]] = fuse_qkv(r["q"], r["k"], r["v"], model)
        out[base + _NEMO_LAYER["proj"]] = r["o"]
        out[base + _NEMO_NORMS["mlp_norm"][norm_index]] = r["mlp_norm"]
        out[base + _NEMO_LAYER["fc1"]] = np.concatenate([r["gate"], r["up"]], axis=0)
        out[base + _NEMO_LAYER["fc2"]] = r["down"]
    out[prefix + _NEMO_GLOBAL["final_norm"]] = roles.pop(("final_norm", None))
    if ("output", None) in roles:
        out[prefix + _NEMO_GLOBAL["output"]] = roles.pop(("output", None))
    return out


def _check_llama_shape(model: ModelSpec) -> None:
    if not model.gated:
        raise ConfigError("model.activation", f"{model.activation!r}: HF Llama's MLP is gated SiLU "
                          "(use fast-swiglu or swiglu)")


def _read_nemo(state: dict, model: ModelSpec) -> dict:
    """{(role, layer or None): array}, checking every key is known, none repeats, and nothing is missing."""
    roles: dict = {}
    suffix_role = {suffix: role for role, suffix in _NEMO_LAYER.items()}
    for role, names in _NEMO_NORMS.items():
        for name in names:
            suffix_role[name] = role
    global_role = {name: role for role, name in _NEMO_GLOBAL.items()}
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        name = key[len("model."):] if key.startswith("model.") else key
        m = _NEMO_LAYER_KEY.match(name)
        if m and m.group(2) in suffix_role:
            slot = (suffix_role[m.group(2)], int(m.group(1)))
            if slot[1] >= model.num_layers:
                raise InputError(f"layer {slot[1]} but num_layers={model.num_layers}", key=key)
        elif not m and name in global_role:
            slot = (global_role[name], None)
        else:
            raise InputError("not a weight of a Llama-shaped NeMo GPT (bias, LayerNorm bias, adapter or other "
                             "extra?)", key=key)
        if slot in roles:
            raise InputError(f"{slot[0]} of layer {slot[1]} given twice (local and Transformer Engine norm names?)",
                             key=key)
        roles[slot] = _array(value, key)
    _require(roles, model, "NeMo", lambda role, layer: _nemo_name(model, role, layer))
    return roles


def _nemo_name(model: ModelSpec, role: str, layer) -> str:
    if layer is None:
        return _NEMO_GLOBAL[role]
    suffix = _NEMO_LAYER.get(role) or _NEMO_NORMS[role][1 if model.transformer_engine else 0]
    return f"decoder.layers.{layer}.{suffix}"


def _read_hf(state: dict, model: ModelSpec) -> dict:
    roles: dict = {}
    suffix_role = {suffix: role for role, suffix in _HF_LAYER.items()}
    global_role = {name: role for role, name in _HF_GLOBAL.items()}
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        m = _HF_LAYER_KEY.match(key)
        if m and m.group(2) in suffix_role:
            slot = (suffix_role[m.group(2)], int(m.group(1)))
            if slot[1] >= model.num_layers:
                raise InputError(f"layer {slot[1]} but num_hidden_layers={model.num_layers}", key=key)
        elif not m and key in global_role:
            slot = (global_role[key], None)
        else:
            raise InputError("not a LlamaForCausalLM weight this exporter maps (a bias, or another architecture?)",
                             key=key)
        roles[slot] = _array(value, key)
    _require(roles, model, "HF", lambda role, layer: f"model.layers.{layer}.{_HF_LAYER[role]}" if layer is not None
             else _HF_GLOBAL[role])
    return roles


def _require(roles: dict, model: ModelSpec, side: str, name_of) -> None:
    layer_roles = ("qkv", "proj", "fc1", "fc2", "input_norm", "mlp_norm") if side == "NeMo" else tuple(_HF_LAYER)
    for role in ("embed", "final_norm"):
        if (role, None) not in roles:
            raise InputError(f"missing from the {side} state", key=name_of(role, None))
    tied = model.share_embeddings_and_output_weights
    if tied and ("output", None) in roles:
        if not np.array_equal(roles[("output", None)], roles[("embed", None)]):
            raise InputError("share_embeddings_and_output_weights is true but the output weight differs from the "
                             "embedding", key=name_of("output", None))
        roles.pop(("output", None))  # tied: the embedding is the output layer; HF and NeMo store it once
    if not tied and ("output", None) not in roles:
        raise InputError(f"missing from the {side} state (share_embeddings_and_output_weights is false)",
                         key=name_of("output", None))
    for layer in range(model.num_layers):
        for role in layer_roles:
            if (role, layer) not in roles:
                raise InputError(f"missing from the {side} state", key=name_of(role, layer))


def _array(value, key: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(value).__name__} (convert tensors at the boundary)",
                         key=key)
    return value


# ---------------------------------------------------------------------------------------------- config.json

def check_llama_compatible(cfg: dict) -> None:
    """Refuse a NeMo model config whose model HF LlamaForCausalLM cannot compute; the error names the key."""
    def refuse(key, why):
        raise ConfigError(f"model.{key}", why)

    if str(cfg.get("normalization", "layernorm")).lower() != "rmsnorm":
        refuse("normalization", f"{cfg.get('normalization', 'layernorm')!r}: HF Llama uses RMSNorm")
    if cfg.get("layernorm_zero_centered_gamma"):
        refuse("layernorm_zero_centered_gamma", "true: HF Llama's RMSNorm scales by the weight itself")
    if str(cfg.get("activation", "gelu")) not in ("fast-swiglu", "swiglu"):
        refuse("activation", f"{cfg.get('activation', 'gelu')!r}: HF Llama's MLP is SwiGLU")
    if cfg.get("position_embedding_type", "learned_absolute") != "rope":
        refuse("position_embedding_type", f"{cfg.get('position_embedding_type', 'learned_absolute')!r}: HF Llama "
               "uses rope")
    if float(cfg.get("rotary_percentage", 1.0)) != 1.0:
        refuse("rotary_percentage", f"{cfg.get('rotary_percentage')}: HF Llama rotates the whole head")
    if cfg.get("rotary_interleaved", False):
        refuse("rotary_interleaved", "true: HF Llama rotates halves, not interleaved pairs")
    if cfg.get("bias", True):
        refuse("bias", "true (NeMo's default): HF Llama has no linear biases; set bias: false")
    if cfg.get("qkv_bias", False):
        refuse("qkv_bias", "true: HF LlamaForCausalLM has no q/k/v bias here")
    if cfg.get("qk_layernorm", False):
        refuse("qk_layernorm", "true: HF Llama has no query/key norm")
    if cfg.get("apply_embedding_scaling", False):
        refuse("apply_embedding_scaling", "true: HF Llama does not scale its embeddings")
    if (cfg.get("mcore_customization_config") or {}).get("final_logit_softcapping"):
        refuse("mcore_customization_config.final_logit_softcapping", "set: HF Llama has no logit soft-capping")
    if cfg.get("num_moe_experts"):
        refuse("num_moe_experts", "set: HF LlamaForCausalLM is dense")
    if cfg.get("name") not in (None, "", "te_gpt"):
        refuse("name", f"{cfg.get('name')!r}: only NeMo's default GPT layer spec is mapped")
    if cfg.get("scale_positional_embedding") and cfg.get("seq_len_interpolation_factor") is not None:
        refuse("seq_len_interpolation_factor", "set together with scale_positional_embedding; HF takes one "
               "rope_scaling")


def _rope_scaling_from_nemo(cfg: dict):
    # megatron_gpt_model.py 197-203 (apply_rope_scaling, the Llama 3.1 formula, NeMo's defaults 8/1/4/8192)
    # and megatron rotary_pos_embedding.py 135 (positions / seq_len_interpolation_factor = HF "linear").
    if cfg.get("scale_positional_embedding"):
        return {"rope_type": "llama3", "factor": float(cfg.get("scale_factor", 8)),
                "low_freq_factor": float(cfg.get("low_freq_factor", 1)),
                "high_freq_factor": float(cfg.get("high_freq_factor", 4)),
                "original_max_position_embeddings": int(cfg.get("old_context_len", 8192))}
    if cfg.get("seq_len_interpolation_factor") is not None:
        return {"rope_type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
    return None


def hf_llama_config(cfg: dict, vocab_size: int, torch_dtype: str = "bfloat16",
                    bos_token_id=None, eos_token_id=None) -> dict:
    """HF config.json for the Llama export of a NeMo base (cfg = model_config.yaml's model section).

    vocab_size: NeMo's padded vocabulary, i.e. the embedding's row count (NeMo pads the tokenizer's
    vocabulary to a multiple of make_vocab_size_divisible_by x TP: megatron_base_model.py 634-641).
    """
    if "hidden_size" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    check_llama_compatible(cfg)
    model = ModelSpec.from_nemo_config(cfg)
    if torch_dtype not in HF_DTYPES:
        raise ConfigError("torch_dtype", f"{torch_dtype!r}; expected one of {', '.join(HF_DTYPES)}")
    max_positions = cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length")
    if not max_positions:
        raise ConfigError("model.max_position_embeddings", "missing (and no encoder_seq_length)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_positions),
        "rms_norm_eps": float(cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(cfg.get("rotary_base", 10000)),
        "rope_scaling": _rope_scaling_from_nemo(cfg),
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": float(cfg.get("init_method_std", 0.02)),
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def nemo_config_from_hf(hf: dict) -> dict:
    """NeMo model config fields for an HF Llama config.json; refuses what NeMo's GPT cannot reproduce.

    Returns the architecture keys only (merge them into a NeMo model config). make_vocab_size_divisible_by
    is the largest power of two <= 128 dividing vocab_size, so NeMo's padding keeps HF's vocabulary at TP=1.
    """
    def refuse(key, why):
        raise ConfigError(key, f"{why} (HF config.json)")

    kind = hf.get("model_type")
    if kind not in ("llama", "mistral"):
        refuse("model_type", f"{kind!r}: only llama and mistral are supported")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if not {"LlamaForCausalLM", "MistralForCausalLM"} & set(archs):
        refuse("architectures", f"{archs}: only LlamaForCausalLM and MistralForCausalLM are supported")
    # Mistral is Llama's layout with sliding-window attention; a window that covers the whole context
    # (Mistral v0.2+: null) is plain causal attention, which is what NeMo's GPT computes.
    window = hf.get("sliding_window")
    if kind == "mistral" and window is not None and int(window) < int(hf.get("max_position_embeddings", 0)):
        refuse("sliding_window", f"{window} < max_position_embeddings: NeMo's GPT here has no sliding-window attention")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{hf.get('hidden_act')!r}: NeMo's fast-swiglu is SiLU-gated")
    if hf.get("attention_bias", False):
        refuse("attention_bias", "true: the NeMo Llama layout has no q/k/v/o biases")
    if hf.get("mlp_bias", False):
        refuse("mlp_bias", "true: the NeMo Llama layout has no MLP biases")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", f"{hf.get('partial_rotary_factor')}: only full-head RoPE is mapped")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not hf.get(key):
            refuse(key, "missing")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
    out = {
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": int(hf["hidden_size"]),
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "kv_channels": None if head_dim * heads == int(hf["hidden_size"]) else int(head_dim),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "encoder_seq_length": int(hf.get("max_position_embeddings", 2048)),
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "rotary_base": float(hf.get("rope_theta", 10000.0)),
        "normalization": "rmsnorm",
        "activation": "fast-swiglu",
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "bias": False,
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        "make_vocab_size_divisible_by": _largest_pow2_divisor(int(hf["vocab_size"]), 128),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            out.update(scale_positional_embedding=True, scale_factor=float(scaling["factor"]),
                       low_freq_factor=float(scaling.get("low_freq_factor", 1)),
                       high_freq_factor=float(scaling.get("high_freq_factor", 4)),
                       old_context_len=int(scaling.get("original_max_position_embeddings", 8192)))
        elif kind == "linear":
            out["seq_len_interpolation_factor"] = float(scaling["factor"])
        elif kind != "default":
            refuse("rope_scaling", f"rope_type {kind!r}: NeMo's GPT implements only llama3 and linear scaling")
    return out


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d
