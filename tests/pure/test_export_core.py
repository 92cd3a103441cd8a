"""nemo_ft.export's pure core on numpy arrays: specs, TP/PP gather and split, LoRA merge, HF mappings.

Tolerances: gather, split, qkv/fc1 (un)fusing and the HF weight maps only move values, so they are
compared exactly (np.array_equal). Merges and simulated TP forwards involve float arithmetic and state
their tolerance where they compare. Seconds, numpy only.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemo_ft.errors import ConfigError, InputError
from nemo_ft.export import (
    AdapterSpec, ModelSpec, expected_keys, fuse_qkv, gather_adapter, hf_llama_config, hf_peft_adapter_config,
    hf_to_nemo_llama, lora_key, lora_to_hf_peft, merge_lora, nemo_config_from_hf, nemo_to_hf_llama,
    shard_path, split_adapter, split_fc1, split_qkv,
)
from nemo_ft.peft import LORA_TARGETS

REPO = Path(__file__).resolve().parents[2]

# 8 heads in 4 query groups; kv_channels 6 so the heads' width (48) differs from hidden (32): a mix-up
# between linear_proj's input and hidden_size shows as a shape error. TP up to 4 divides everything.
MODEL = dict(hidden_size=32, num_attention_heads=8, num_query_groups=4, kv_channels=6, num_layers=4,
             ffn_hidden_size=40, activation="fast-swiglu")
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]


def model_spec(**over) -> ModelSpec:
    return ModelSpec(**{**MODEL, **over})


def lora_spec(tp=1, pp=1, targets=LORA_TARGETS, r=8, alpha=16.0, **over) -> AdapterSpec:
    return AdapterSpec(model=model_spec(), schemes=("lora",), tp=tp, pp=pp, adapter_dim=r, alpha=alpha,
                       targets=tuple(targets), **over)


def random_adapter(spec, seed=0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(p.shape).astype(dtype) for k, p in expected_keys(spec).items()}


def nemo_cfg(**over) -> dict:
    cfg = {"hidden_size": 32, "num_attention_heads": 8, "num_query_groups": 4, "kv_channels": 6, "num_layers": 4,
           "ffn_hidden_size": 40, "activation": "fast-swiglu", "normalization": "rmsnorm",
           "position_embedding_type": "rope", "bias": False, "share_embeddings_and_output_weights": False,
           "max_position_embeddings": 128, "encoder_seq_length": 128, "layernorm_epsilon": 1e-5,
           "rotary_base": 10000, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
           "peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 8, "alpha": 16,
                                                           "target_modules": ["all"]}}}
    cfg.update(over)
    return cfg


# ------------------------------------------------------------------------------------------------ spec

def test_spec_from_nemo_config_reads_nemo_keys_and_defaults():
    spec = AdapterSpec.from_nemo_config(nemo_cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    assert (spec.tp, spec.pp, spec.adapter_dim, spec.alpha, spec.scale) == (2, 2, 8, 16.0, 2.0)
    assert spec.targets == LORA_TARGETS
    m = spec.model
    assert (m.head_dim, m.q_size, m.kv_size, m.qkv_size, m.fc1_size) == (6, 48, 24, 96, 80)
    # NeMo's defaults: alpha = adapter_dim, target attention_qkv, MHA, kv_channels = hidden // heads
    cfg = nemo_cfg(num_query_groups=None, kv_channels=None)
    cfg["peft"] = {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 4}}
    spec = AdapterSpec.from_nemo_config({"model": cfg})
    assert (spec.alpha, spec.scale, spec.targets) == (4.0, 1.0, ("attention_qkv",))
    assert (spec.model.num_query_groups, spec.model.kv_channels) == (8, 4)
    assert ModelSpec.from_nemo_config({"hidden_size": 8, "num_attention_heads": 2, "num_layers": 1,
                                       "ffn_hidden_size": 8}).share_embeddings_and_output_weights is True


@pytest.mark.parametrize("change, key", [
    ({"pipeline_model_parallel_size": 3}, "model.pipeline_model_parallel_size"),
    ({"num_layers_in_first_pipeline_stage": 1}, "model.num_layers_in_first_pipeline_stage"),
    ({"virtual_pipeline_model_parallel_size": 2}, "model.virtual_pipeline_model_parallel_size"),
    ({"tensor_model_parallel_size": 3}, "model.tensor_model_parallel_size"),
    ({"num_moe_experts": 4}, "model.num_moe_experts"),
    ({"hidden_size": None}, "model.hidden_size"),
])
def test_spec_refuses_layouts_it_cannot_map(change, key):
    with pytest.raises(ConfigError) as err:
        AdapterSpec.from_nemo_config(nemo_cfg(**change))
    assert err.value.key == key


@pytest.mark.parametrize("lora, key", [
    ({"adapter_dim": 6}, "model.peft.lora_tuning.adapter_dim"),          # 6 % TP=4
    ({"alpha": "${model.peft.lora_tuning.adapter_dim}"}, "model.peft.lora_tuning.alpha"),
    ({"variant": "canonical"}, "model.peft.lora_tuning.variant"),
    ({"weight_tying": True}, "model.peft.lora_tuning.weight_tying"),
    ({"target_modules": ["attention_qkv", "bogus"]}, "model.peft.lora_tuning.target_modules"),
    ({"layer_selection": [0]}, "model.peft.lora_tuning.layer_selection"),  # NeMo counts from 1
])
def test_spec_refuses_lora_settings(lora, key):
    cfg = nemo_cfg(tensor_model_parallel_size=4)
    cfg["peft"]["lora_tuning"].update(lora)
    with pytest.raises(ConfigError) as err:
        AdapterSpec.from_nemo_config(cfg)
    assert err.value.key == key


def test_spec_refuses_swiglu_fc1_lora_none_and_selective():
    # NeMo doubles the fc1 adapter only for fast-* activations; with "swiglu" its LoRA cannot be built.
    with pytest.raises(ConfigError) as err:
        AdapterSpec.from_nemo_config(nemo_cfg(activation="swiglu"))
    assert err.value.key == "model.activation"
    for scheme in ("none", "selective"):
        with pytest.raises(ConfigError) as err:
            AdapterSpec.from_nemo_config(nemo_cfg(peft={"peft_scheme": scheme}))
        assert err.value.key == "model.peft.peft_scheme"


# ------------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_split_then_gather_is_identity_all_four_targets(tp, pp):
    spec = lora_spec(tp=tp, pp=pp)
    full = random_adapter(spec)
    shards = split_adapter(full, spec, tp, pp)
    assert sorted(shards) == [(t, p) for t in range(tp) for p in range(pp)]
    # stage-local layer numbers, as NeMo saves them
    per_stage = 4 // pp
    for (t, p), state in shards.items():
        layers = {int(k.split(".")[3]) for k in state}
        assert layers == set(range(per_stage))
    back = gather_adapter(shards, spec)
    assert back.keys() == full.keys()
    for key in full:
        assert back[key].dtype == full[key].dtype
        assert np.array_equal(back[key], full[key]), key  # exact: pure moves


def nemo_rank_shards(full: dict, spec: AdapterSpec, tp: int, pp: int) -> dict:
    """Per-rank shards built the way NeMo's ranks hold them, written out by hand (not via split_adapter)."""
    m, r = spec.model, spec.adapter_dim
    per_stage = m.num_layers // pp
    shards = {(t, p): {} for t in range(tp) for p in range(pp)}
    for layer in range(m.num_layers):
        p, local = divmod(layer, per_stage)
        for target in spec.targets:
            a, b = full[lora_key(layer, target, "A")], full[lora_key(layer, target, "B")]
            for t in range(tp):
                if target in ("attention_qkv", "mlp_fc1"):   # ColumnParallelLinear A [r/tp, in]
                    a_t = a[t * r // tp:(t + 1) * r // tp]
                else:                                        # RowParallelLinear A [r, in/tp]
                    n = a.shape[1] // tp
                    a_t = a[:, t * n:(t + 1) * n]
                if target == "mlp_fc1":                      # rank t's [gate_t; up_t]
                    f = m.ffn_hidden_size // tp
                    gate, up = b[:m.ffn_hidden_size], b[m.ffn_hidden_size:]
                    b_t = np.concatenate([gate[t * f:(t + 1) * f], up[t * f:(t + 1) * f]])
                else:                                        # every B is column-parallel: rows split
                    n = b.shape[0] // tp
                    b_t = b[t * n:(t + 1) * n]
                key_a = lora_key(local, target, "A")
                shards[(t, p)][key_a] = a_t.copy()
                shards[(t, p)][lora_key(local, target, "B")] = b_t.copy()
    return shards


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_gather_of_independently_built_nemo_shards_reproduces_full(tp, pp):
    spec = lora_spec(tp=tp, pp=pp)
    full = random_adapter(spec, seed=1)
    back = gather_adapter(nemo_rank_shards(full, spec, tp, pp), spec)
    for key in full:
        assert np.array_equal(back[key], full[key]), key


def test_plain_concatenation_of_gated_fc1_would_differ():
    spec = lora_spec(tp=2)
    full = random_adapter(spec, seed=2)
    shards = nemo_rank_shards(full, spec, 2, 1)
    key = lora_key(0, "mlp_fc1", "B")
    plain = np.concatenate([shards[(0, 0)][key], shards[(1, 0)][key]])
    assert not np.array_equal(plain, full[key])          # [g0;u0;g1;u1] is not [g0;g1;u0;u1]
    assert np.array_equal(gather_adapter(shards, spec)[key], full[key])


def _silu(x):
    return x / (1.0 + np.exp(-x))


def test_gathered_lora_computes_what_nemo_tp2_ranks_compute():
    """Random per-rank shards (independent of split_adapter) run through NeMo's TP=2 forward semantics
    must equal the TP=1 forward with the gathered adapter. float64 throughout; atol 1e-10."""
    tp, spec = 2, lora_spec(tp=2, pp=1, alpha=24.0)
    m, r, s = spec.model, spec.adapter_dim, spec.scale
    rng = np.random.default_rng(3)
    shards = {(t, 0): {} for t in range(tp)}
    for key, param in expected_keys(spec).items():
        for t in range(tp):
            shape = list(param.shape)
            shape[0 if param.split in ("rows", "gated_rows") else 1] //= tp
            shards[(t, 0)][key] = rng.standard_normal(shape)
    full = gather_adapter(shards, spec)
    x = rng.standard_normal((5, m.hidden_size))
    w1 = rng.standard_normal((m.fc1_size, m.hidden_size))            # TP=1 base fc1 [gate; up]
    w2 = rng.standard_normal((m.hidden_size, m.ffn_hidden_size))
    wqkv = rng.standard_normal((m.qkv_size, m.hidden_size))
    wo = rng.standard_normal((m.hidden_size, m.q_size))
    ctx = rng.standard_normal((5, m.q_size))
    f = m.ffn_hidden_size // tp
    sh = lambda t, layer, target, w: shards[(t, 0)][lora_key(layer, target, w)]  # noqa: E731

    # --- MLP at TP=2: fc1 column-parallel with per-rank GLU, fc2 row-parallel ---
    a1 = np.concatenate([sh(t, 0, "mlp_fc1", "A") for t in range(tp)], axis=0)  # linear_in gather_output=True
    h1 = x @ a1.T
    out = 0.0
    lora2_in = 0.0
    acts = []
    for t in range(tp):
        w1_t = np.concatenate([w1[t * f:(t + 1) * f], w1[m.ffn_hidden_size + t * f:m.ffn_hidden_size + (t + 1) * f]])
        inter = x @ w1_t.T + s * (h1 @ sh(t, 0, "mlp_fc1", "B").T)
        act = _silu(inter[:, :f]) * inter[:, f:]                         # mcore glu on the local chunk
        acts.append(act)
        out = out + act @ w2[:, t * f:(t + 1) * f].T                      # row-parallel base, all-reduced
        lora2_in = lora2_in + act @ sh(t, 0, "mlp_fc2", "A").T            # row-parallel linear_in, all-reduced
    out = out + s * np.concatenate([lora2_in @ sh(t, 0, "mlp_fc2", "B").T for t in range(tp)], axis=1)

    A1, B1 = full[lora_key(0, "mlp_fc1", "A")], full[lora_key(0, "mlp_fc1", "B")]
    A2, B2 = full[lora_key(0, "mlp_fc2", "A")], full[lora_key(0, "mlp_fc2", "B")]
    inter = x @ w1.T + s * (x @ A1.T @ B1.T)
    act = _silu(inter[:, :m.ffn_hidden_size]) * inter[:, m.ffn_hidden_size:]
    ref = act @ w2.T + s * (act @ A2.T @ B2.T)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)

    # --- attention at TP=2: qkv column-parallel (local rows = whole groups), dense row-parallel ---
    aq = np.concatenate([sh(t, 0, "attention_qkv", "A") for t in range(tp)], axis=0)
    qkv_tp = np.concatenate([x @ wqkv[t * m.qkv_size // tp:(t + 1) * m.qkv_size // tp].T
                             + s * (x @ aq.T @ sh(t, 0, "attention_qkv", "B").T) for t in range(tp)], axis=1)
    Aq, Bq = full[lora_key(0, "attention_qkv", "A")], full[lora_key(0, "attention_qkv", "B")]
    np.testing.assert_allclose(qkv_tp, x @ wqkv.T + s * (x @ Aq.T @ Bq.T), rtol=0, atol=1e-10)
    n = m.q_size // tp
    lora_in = sum(ctx[:, t * n:(t + 1) * n] @ sh(t, 0, "attention_dense", "A").T for t in range(tp))
    dense_tp = (sum(ctx[:, t * n:(t + 1) * n] @ wo[:, t * n:(t + 1) * n].T for t in range(tp))
                + s * np.concatenate([lora_in @ sh(t, 0, "attention_dense", "B").T for t in range(tp)], axis=1))
    Ao, Bo = full[lora_key(0, "attention_dense", "A")], full[lora_key(0, "attention_dense", "B")]
    np.testing.assert_allclose(dense_tp, ctx @ wo.T + s * (ctx @ Ao.T @ Bo.T), rtol=0, atol=1e-10)


def other_spec(schemes, tp=1, pp=1, **over):
    kw = dict(model=model_spec(), schemes=schemes, tp=tp, pp=pp, adapter_dim=8, alpha=8.0,
              targets=("attention_qkv",), adapter_tuning_dim=8, virtual_tokens=3, bottleneck_dim=8, embedding_dim=12)
    kw.update(over)
    return AdapterSpec(**kw)


@pytest.mark.parametrize("schemes", [("ia3",), ("adapter",), ("ptuning",), ("ptuning", "lora")])
@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_other_schemes_split_then_gather_is_identity(schemes, tp, pp):
    spec = other_spec(schemes, tp, pp)
    full = random_adapter(spec, seed=4)
    shards = split_adapter(full, spec, tp, pp)
    if "ptuning" in schemes and pp > 1:
        assert not any("ptuning" in k for t in range(tp) for k in shards[(t, 1)])  # only stage 0 holds it
    back = gather_adapter(shards, spec)
    assert all(np.array_equal(back[k], full[k]) for k in full) and back.keys() == full.keys()


def test_ptuning_and_canonical_adapter_gather_match_tp2_forward():
    """NeMo's TP=2 prompt encoder and canonical adapter, from random rank shards, vs TP=1 on the gathered
    tensors. float64, atol 1e-10."""
    tp = 2
    spec = other_spec(("ptuning", "adapter"), tp=tp)
    rng = np.random.default_rng(5)
    shards = {(t, 0): {} for t in range(tp)}
    for key, param in expected_keys(spec).items():
        shape = list(param.shape)
        if param.split in ("rows", "cols"):
            shape[0 if param.split == "rows" else 1] //= tp
            for t in range(tp):
                shards[(t, 0)][key] = rng.standard_normal(shape)
        else:  # replicated: the same on both ranks
            value = rng.standard_normal(shape)
            for t in range(tp):
                shards[(t, 0)][key] = value.copy()
    full = gather_adapter(shards, spec)
    gelu = lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v ** 3)))  # noqa: E731
    P = "model.embedding.adapter_layer.ptuning_adapter."
    emb = shards[(0, 0)][P + "embedding.weight"]
    out = shards[(0, 0)][P + "second.bias"] + sum(
        gelu(emb @ shards[(t, 0)][P + "first.weight"].T + shards[(t, 0)][P + "first.bias"])
        @ shards[(t, 0)][P + "second.weight"].T for t in range(tp))
    ref = gelu(emb @ full[P + "first.weight"].T + full[P + "first.bias"]) @ full[P + "second.weight"].T \
        + full[P + "second.bias"]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)

    # canonical adapter_1: LN (replicated) -> column linear_in (gathered) -> swish -> row linear_out
    # (input_is_parallel=False: the input is scattered along its last dim, partial outputs summed)
    A = "model.decoder.layers.0.adapter_layer.adapter_1."
    x = rng.standard_normal((5, spec.model.hidden_size))
    h = x @ np.concatenate([shards[(t, 0)][A + "linear_in.weight"] for t in range(tp)], axis=0).T
    h = _silu(h)
    d = spec.adapter_tuning_dim // tp
    out = sum(h[:, t * d:(t + 1) * d] @ shards[(t, 0)][A + "linear_out.weight"].T for t in range(tp))
    ref = _silu(x @ full[A + "linear_in.weight"].T) @ full[A + "linear_out.weight"].T
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


def test_ia3_scalers_gather_in_rank_order():
    spec = other_spec(("ia3",), tp=2)
    k = "model.decoder.layers.1.self_attention.adapter_layer.key_infused_adapter.scalers"
    shards = split_adapter(random_adapter(spec), spec, 2, 1)
    shards[(0, 0)][k] = np.arange(12.0)        # kv_size 24 / TP 2: rank 0 holds query groups 0-1
    shards[(1, 0)][k] = np.arange(12.0, 24.0)
    assert np.array_equal(gather_adapter(shards, spec)[k], np.arange(24.0))


def test_layer_selection_covers_only_selected_layers():
    spec = lora_spec(tp=1, pp=2, targets=("attention_qkv",), layer_selection={"lora": [2, 4]})
    keys = expected_keys(spec)
    assert {int(k.split(".")[3]) for k in keys} == {1, 3}
    full = random_adapter(spec)
    assert gather_adapter(split_adapter(full, spec, 1, 2), spec).keys() == full.keys()
    shards = split_adapter(full, spec, 1, 2)
    shards[(0, 0)][lora_key(0, "attention_qkv", "A")] = np.zeros((8, 32), np.float32)  # layer 0: unselected
    with pytest.raises(InputError, match="layer_selection"):
        gather_adapter(shards, spec)


# --- errors name the shard and the problem

def _two_by_two():
    spec = lora_spec(tp=2, pp=2)
    return spec, split_adapter(random_adapter(spec), spec, 2, 2)


def test_gather_error_missing_shard():
    spec, shards = _two_by_two()
    del shards[(1, 0)]
    with pytest.raises(InputError) as err:
        gather_adapter(shards, spec)
    assert err.value.path == "tp_rank_01_pp_rank_000/model_weights.ckpt"
    assert "shard missing" in str(err.value)


def test_gather_error_shapes_disagree_between_ranks():
    spec, shards = _two_by_two()
    key = lora_key(1, "attention_dense", "A")
    shards[(1, 1)][key] = np.zeros((8, 48), np.float32)  # a full-width A where a TP half belongs
    with pytest.raises(InputError) as err:
        gather_adapter(shards, spec)
    assert err.value.path == "tp_rank_01_pp_rank_001/model_weights.ckpt" and err.value.key == key
    assert "tp_rank=0: (8, 24), tp_rank=1: (8, 48)" in str(err.value)


def test_gather_error_rank_not_divisible_by_tp():
    spec = lora_spec(tp=1, r=6)
    with pytest.raises(ConfigError) as err:
        gather_adapter({(0, 0): {}, (1, 0): {}, (2, 0): {}, (3, 0): {}}, spec, tp=4, pp=1)
    assert err.value.key == "model.peft.lora_tuning.adapter_dim"


def test_gather_error_unrecognised_and_foreign_keys():
    spec, shards = _two_by_two()
    shards[(0, 1)]["model.decoder.layers.0.self_attention.linear_qkv.weight"] = np.zeros((48, 32))
    with pytest.raises(InputError, match="not an adapter key") as err:
        gather_adapter(shards, spec)
    assert err.value.path == "tp_rank_00_pp_rank_001/model_weights.ckpt"
    spec, shards = _two_by_two()
    shards[(0, 0)]["model.decoder.layers.0.mlp.adapter_layer.mlp_infused_adapter.scalers"] = np.ones(20)
    with pytest.raises(InputError, match="ia3 adapter tensor, but this config's peft_scheme is lora"):
        gather_adapter(shards, spec)
    spec = lora_spec(targets=("attention_qkv",))
    shards = split_adapter(random_adapter(spec), spec, 1, 1)
    shards[(0, 0)][lora_key(0, "mlp_fc2", "A")] = np.ones((8, 40))
    with pytest.raises(InputError, match="not in this config's target_modules"):
        gather_adapter(shards, spec)
    shards = split_adapter(random_adapter(spec), spec, 1, 1)
    shards[(0, 0)]["model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight"] = \
        "not an array"
    with pytest.raises(InputError, match="numpy array"):
        gather_adapter(shards, spec)


def test_gather_error_layer_twice_and_global_numbers():
    spec, shards = _two_by_two()
    key = lora_key(0, "attention_qkv", "A")
    shards[(0, 0)][key.replace("model.", "model.module.", 1)] = shards[(0, 0)][key]  # O2 spelling of the same
    with pytest.raises(InputError, match="appears twice"):
        gather_adapter(shards, spec)
    spec, shards = _two_by_two()
    # stage 1 saved with global numbers (2, 3) instead of stage-local (0, 1)
    shards[(0, 1)] = {k.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3."): v
                      for k, v in shards[(0, 1)].items()}
    with pytest.raises(InputError, match="already global"):
        gather_adapter(shards, spec)


def test_gather_error_missing_tensor_and_missing_on_one_rank():
    spec, shards = _two_by_two()
    key = lora_key(1, "mlp_fc2", "B")
    del shards[(1, 1)][key]
    with pytest.raises(InputError, match=r"missing on tp_rank\(s\) \[1\]") as err:
        gather_adapter(shards, spec)
    assert err.value.path == "tp_rank_01_pp_rank_001/model_weights.ckpt" and err.value.key == key
    spec, shards = _two_by_two()
    for t in range(2):
        del shards[(t, 0)][key]
    with pytest.raises(InputError, match="missing on every TP rank"):
        gather_adapter(shards, spec)


def test_gather_error_replicated_disagrees_ptuning_off_stage0_nested():
    spec = other_spec(("ptuning",), tp=2, pp=2)
    full = random_adapter(spec)
    shards = split_adapter(full, spec, 2, 2)
    bias = "model.embedding.adapter_layer.ptuning_adapter.second.bias"
    shards[(1, 0)][bias] = shards[(1, 0)][bias] + 1e-3
    with pytest.raises(InputError, match="replicated tensor differs"):
        gather_adapter(shards, spec)
    shards = split_adapter(full, spec, 2, 2)
    shards[(0, 1)][bias] = full[bias]
    with pytest.raises(InputError, match="only PP stage 0"):
        gather_adapter(shards, spec)
    spec = lora_spec()
    with pytest.raises(InputError, match="virtual pipeline"):
        gather_adapter({(0, 0): {"model_0": {}}}, spec)


def test_shard_paths_follow_nemo_naming():
    assert shard_path(0, 0, 1, 1) == "model_weights.ckpt"
    assert shard_path(1, 0, 2, 1) == "mp_rank_01/model_weights.ckpt"
    assert shard_path(0, 1, 1, 2) == "tp_rank_00_pp_rank_001/model_weights.ckpt"


# ------------------------------------------------------------------------------------------------ merge

def random_base(model: ModelSpec, seed=0, prefix="model.", vocab=64, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {f"{prefix}embedding.word_embeddings.weight": rng.standard_normal((vocab, model.hidden_size)),
           f"{prefix}decoder.final_layernorm.weight": rng.standard_normal(model.hidden_size),
           f"{prefix}output_layer.weight": rng.standard_normal((vocab, model.hidden_size))}
    for n in range(model.num_layers):
        b = f"{prefix}decoder.layers.{n}."
        out[b + "input_layernorm.weight"] = rng.standard_normal(model.hidden_size)
        out[b + "self_attention.linear_qkv.weight"] = rng.standard_normal((model.qkv_size, model.hidden_size))
        out[b + "self_attention.linear_proj.weight"] = rng.standard_normal((model.hidden_size, model.q_size))
        out[b + "pre_mlp_layernorm.weight"] = rng.standard_normal(model.hidden_size)
        out[b + "mlp.linear_fc1.weight"] = rng.standard_normal((model.fc1_size, model.hidden_size))
        out[b + "mlp.linear_fc2.weight"] = rng.standard_normal((model.hidden_size, model.ffn_hidden_size))
    return {k: v.astype(dtype) for k, v in out.items()}


BASE_OF = {"attention_qkv": "self_attention.linear_qkv", "attention_dense": "self_attention.linear_proj",
           "mlp_fc1": "mlp.linear_fc1", "mlp_fc2": "mlp.linear_fc2"}


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_merge_matches_direct_computation(prefix):
    spec = lora_spec(alpha=24.0)  # scale 3
    base, adapter = random_base(spec.model, prefix=prefix), random_adapter(spec, seed=7)
    merged = merge_lora(base, adapter, spec)
    for n in range(4):
        for target in LORA_TARGETS:
            key = f"{prefix}decoder.layers.{n}.{BASE_OF[target]}.weight"
            a = adapter[lora_key(n, target, "A")].astype(np.float64)
            b = adapter[lora_key(n, target, "B")].astype(np.float64)
            want = base[key].astype(np.float64) + 3.0 * (b @ a)
            assert merged[key].dtype == np.float32
            np.testing.assert_allclose(merged[key], want, rtol=1e-5, atol=1e-5)  # fp32 vs fp64 reference
    untouched = f"{prefix}decoder.layers.0.input_layernorm.weight"
    assert merged[untouched] is base[untouched]


def test_merge_applies_alpha_over_r():
    # alpha != r: NeMo's merge.py adds B @ A without alpha / r; that is a different model.
    spec = lora_spec(r=8, alpha=32.0, targets=("attention_qkv",))
    base, adapter = random_base(spec.model), random_adapter(spec, seed=8)
    key = "model.decoder.layers.2.self_attention.linear_qkv.weight"
    a, b = adapter[lora_key(2, "attention_qkv", "A")], adapter[lora_key(2, "attention_qkv", "B")]
    merged = merge_lora(base, adapter, spec)[key]
    without_scale = base[key] + b @ a
    assert np.max(np.abs(merged - without_scale)) > 1.0
    np.testing.assert_allclose(merged, base[key] + 4.0 * (b @ a), rtol=1e-5, atol=1e-4)


def test_merge_is_float32_from_half_inputs_and_errors():
    spec = lora_spec(targets=("mlp_fc2",))
    base = random_base(spec.model, dtype=np.float16)
    merged = merge_lora(base, random_adapter(spec, dtype=np.float16), spec)
    assert merged["model.decoder.layers.0.mlp.linear_fc2.weight"].dtype == np.float32
    del base["model.decoder.layers.3.mlp.linear_fc2.weight"]
    with pytest.raises(InputError, match="base weight for LoRA target mlp_fc2 of layer 3"):
        merge_lora(base, random_adapter(spec), spec)
    with pytest.raises(ConfigError):
        merge_lora({}, {}, other_spec(("ia3",)))


# ------------------------------------------------------------------------------------------------ HF Llama

def test_split_qkv_matches_per_group_layout():
    m = model_spec()
    # label each row with (kind, head, channel): NeMo's groups are [q heads of the group..., k, v]
    rows, labels = [], []
    for g in range(m.num_query_groups):
        for j in range(m.heads_per_group):
            labels += [("q", g * m.heads_per_group + j, c) for c in range(m.head_dim)]
        labels += [("k", g, c) for c in range(m.head_dim)] + [("v", g, c) for c in range(m.head_dim)]
    code = {lab: i for i, lab in enumerate(sorted(set(labels)))}
    w = np.array([[code[lab]] for lab in labels], dtype=np.float64)
    q, k, v = split_qkv(w, m)
    assert [code[("q", h, c)] for h in range(m.num_attention_heads) for c in range(m.head_dim)] == list(q[:, 0])
    assert [code[("k", g, c)] for g in range(m.num_query_groups) for c in range(m.head_dim)] == list(k[:, 0])
    assert [code[("v", g, c)] for g in range(m.num_query_groups) for c in range(m.head_dim)] == list(v[:, 0])
    assert np.array_equal(fuse_qkv(q, k, v, m), w)
    gate, up = split_fc1(np.arange(80.0)[:, None], m)
    assert (gate[:, 0] == np.arange(40)).all() and (up[:, 0] == np.arange(40, 80)).all()


@pytest.mark.parametrize("te, prefix, tied", [(False, "model.", False), (True, "", False), (False, "model.", True)])
def test_nemo_hf_round_trip_is_exact(te, prefix, tied):
    m = model_spec(transformer_engine=te, share_embeddings_and_output_weights=tied)
    base = random_base(m, prefix=prefix)
    if te:
        base = {k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
                 .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v for k, v in base.items()}
    if tied:
        del base[f"{prefix}output_layer.weight"]
    base[f"{prefix}decoder.layers.0.self_attention.linear_qkv._extra_state"] = None  # TE metadata: ignored
    hf = nemo_to_hf_llama(base, m)
    assert ("lm_head.weight" in hf) is (not tied)
    proj = base[f"{prefix}decoder.layers.1.self_attention.linear_proj.weight"]
    assert hf["model.layers.1.self_attn.o_proj.weight"] is proj
    assert len(hf) == 2 + (not tied) + 9 * m.num_layers
    back = hf_to_nemo_llama(hf, m, prefix=prefix)
    del base[f"{prefix}decoder.layers.0.self_attention.linear_qkv._extra_state"]
    assert back.keys() == base.keys()
    assert all(np.array_equal(back[k], base[k]) for k in base)


def test_nemo_hf_mapping_errors():
    m = model_spec(share_embeddings_and_output_weights=False)
    base = random_base(m)
    bad = dict(base, **{"model.decoder.layers.0.self_attention.linear_qkv.bias": np.zeros(96)})
    with pytest.raises(InputError) as err:
        nemo_to_hf_llama(bad, m)
    assert err.value.key == "model.decoder.layers.0.self_attention.linear_qkv.bias"
    both = dict(base, **{"model.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": np.zeros(32)})
    with pytest.raises(InputError, match="given twice"):
        nemo_to_hf_llama(both, m)
    short = {k: v for k, v in base.items() if "layers.3.mlp.linear_fc2" not in k}
    with pytest.raises(InputError, match="missing") as err:
        nemo_to_hf_llama(short, m)
    assert err.value.key == "decoder.layers.3.mlp.linear_fc2.weight"
    with pytest.raises(InputError, match="output_layer"):
        nemo_to_hf_llama({k: v for k, v in base.items() if "output_layer" not in k}, m)
    with pytest.raises(InputError, match="differs from the embedding"):
        nemo_to_hf_llama(base, model_spec(share_embeddings_and_output_weights=True))


def test_hf_config_from_nemo_and_back():
    cfg = nemo_cfg()
    hf = hf_llama_config(cfg, vocab_size=512, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert (hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]) == (512, 32, 40, 4)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (8, 4, 6)
    assert (hf["rms_norm_eps"], hf["rope_theta"], hf["max_position_embeddings"]) == (1e-5, 10000.0, 128)
    assert hf["rope_scaling"] is None and hf["tie_word_embeddings"] is False
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["torch_dtype"]) == (1, 2, "bfloat16")
    json.dumps(hf)
    back = nemo_config_from_hf(hf)
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "layernorm_epsilon", "rotary_base", "share_embeddings_and_output_weights"):
        assert back[key] == cfg[key], key
    assert back["make_vocab_size_divisible_by"] == 128
    llama31 = hf_llama_config(nemo_cfg(scale_positional_embedding=True, scale_factor=8, old_context_len=8192),
                              vocab_size=512)
    assert llama31["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert nemo_config_from_hf(llama31)["scale_positional_embedding"] is True
    linear = hf_llama_config(nemo_cfg(seq_len_interpolation_factor=4), vocab_size=512)
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert nemo_config_from_hf(linear)["seq_len_interpolation_factor"] == 4.0


@pytest.mark.parametrize("change, key", [
    ({"bias": True}, "model.bias"), ({"normalization": "layernorm"}, "model.normalization"),
    ({"rotary_percentage": 0.5}, "model.rotary_percentage"), ({"rotary_interleaved": True}, "model.rotary_interleaved"),
    ({"activation": "gelu"}, "model.activation"), ({"qk_layernorm": True}, "model.qk_layernorm"),
    ({"position_embedding_type": "learned_absolute"}, "model.position_embedding_type"),
])
def test_hf_config_refuses_nemo_features_llama_lacks(change, key):
    with pytest.raises(ConfigError) as err:
        hf_llama_config(nemo_cfg(**change), vocab_size=512)
    assert err.value.key == key


@pytest.mark.parametrize("change, key", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
    ({"model_type": "gpt2"}, "model_type"), ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window"),
])
def test_nemo_config_from_hf_refuses_unsupported(change, key):
    hf = dict(hf_llama_config(nemo_cfg(), vocab_size=512), **change)
    with pytest.raises(ConfigError) as err:
        nemo_config_from_hf(hf)
    assert err.value.key == key


def test_mistral_without_a_short_sliding_window_is_llama():
    llama = hf_llama_config(nemo_cfg(), vocab_size=512)
    for window in (None, llama["max_position_embeddings"]):
        mistral = dict(llama, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
        assert nemo_config_from_hf(mistral) == nemo_config_from_hf(llama)


# ------------------------------------------------------------------------------------------------ HF PEFT

def test_lora_to_hf_peft_unfuses_exactly():
    spec = lora_spec(alpha=24.0)
    adapter = random_adapter(spec, seed=9)
    hf = lora_to_hf_peft(adapter, spec)
    assert len(hf) == 4 * 7 * 2
    m = spec.model
    for n in range(4):
        p = f"base_model.model.model.layers.{n}."
        a_qkv, b_qkv = adapter[lora_key(n, "attention_qkv", "A")], adapter[lora_key(n, "attention_qkv", "B")]
        for name, rows in zip(("q", "k", "v"), split_qkv(b_qkv, m)):
            assert np.array_equal(hf[p + f"self_attn.{name}_proj.lora_A.weight"], a_qkv)
            assert np.array_equal(hf[p + f"self_attn.{name}_proj.lora_B.weight"], rows)
        assert hf[p + "self_attn.k_proj.lora_B.weight"].shape == (m.kv_size, 8)
        # delta per HF module = that module's rows of the fused delta (fp32, atol 1e-5)
        fused = split_qkv(b_qkv @ a_qkv, m)
        for name, rows in zip(("q", "k", "v"), fused):
            np.testing.assert_allclose(hf[p + f"self_attn.{name}_proj.lora_B.weight"] @ a_qkv, rows, atol=1e-5)
        b_fc1 = adapter[lora_key(n, "mlp_fc1", "B")]
        assert np.array_equal(hf[p + "mlp.gate_proj.lora_B.weight"], b_fc1[:40])
        assert np.array_equal(hf[p + "mlp.up_proj.lora_B.weight"], b_fc1[40:])
        assert np.array_equal(hf[p + "mlp.down_proj.lora_A.weight"], adapter[lora_key(n, "mlp_fc2", "A")])
        assert np.array_equal(hf[p + "self_attn.o_proj.lora_B.weight"], adapter[lora_key(n, "attention_dense", "B")])


def test_hf_peft_adapter_config():
    spec = lora_spec(r=8, alpha=24.0)
    cfg = hf_peft_adapter_config(spec, "out/hf_base")
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 24.0)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg["bias"], cfg["fan_in_fan_out"], cfg["use_rslora"]) == ("none", False, False)
    assert cfg["base_model_name_or_path"] == "out/hf_base" and cfg["layers_to_transform"] is None
    json.dumps(cfg)
    partial = hf_peft_adapter_config(lora_spec(layer_selection={"lora": [1, 3]}), "b")
    assert partial["layers_to_transform"] == [0, 2]
    with pytest.raises(ConfigError):
        hf_peft_adapter_config(other_spec(("ptuning", "lora")), "b")


# ------------------------------------------------------------------------------------------------ purity

def test_export_core_imports_no_heavy_stack():
    code = ("import sys, nemo_ft.export; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nemo', 'megatron', 'lightning', "
            "'pytorch_lightning', 'omegaconf', 'hydra', 'transformers', 'peft', 'safetensors') "
            "or m.startswith(('nemo_ft.config', 'nemo_ft.stages', 'nemo_ft.runtime'))]; print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
