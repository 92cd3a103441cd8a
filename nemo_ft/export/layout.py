"""Adapter tensors across NeMo's TP x PP ranks: gather the shards into one TP=1/PP=1 adapter, and split it back.

Input to gather is {(tp_rank, pp_rank): {key: numpy array}}, one dict per model_weights.ckpt exactly as
NeMo 2.4 saves PEFT checkpoints (keys `model.decoder.layers.{stage-local layer}.<adapter>...`); the
output is one dict with global layer numbers, which is what a TP=1/PP=1 run saves, so it can be written
as a canonical model_weights.ckpt. split_adapter is the inverse (to reshard between layouts).

How each tensor is sharded was read from NeMo's and megatron-core's source, not assumed (line numbers
of the installed NeMo 2.4.1 under nemo/collections/nlp/{modules/common/megatron/adapters,parts,parts/mixins}/
and megatron-core 0.13.1 under megatron/core/):
- megatron ColumnParallelLinear holds weight [out/tp, in], bias [out/tp] (tensor_parallel/layers.py
  825-826, 855 partition_dim=0, 866-867); RowParallelLinear holds weight [out, in/tp] (1137-1138,
  1168 partition_dim=1) and a full, replicated bias [out] (1176). Rank r holds the r-th contiguous
  slice; gathers concatenate in rank order (tensor_parallel/mappings.py 80-94).
- LoRA (ParallelLinearAdapter, parallel_adapters.py 159-244, configs 536-565; LoRA passes
  gather_output=False, peft_config.py 264):
  * column-parallel targets (attention_qkv, mlp_fc1; input_is_parallel=False): linear_in (A) is a
    ColumnParallelLinear(in, r, gather_output=True) -> A split on dim 0, so the rank r is split across
    TP; linear_out (B) is a ColumnParallelLinear(r, out, gather_output=False) -> B split on dim 0.
  * row-parallel targets (attention_dense, mlp_fc2; input_is_parallel=True): linear_in (A) is a
    RowParallelLinear(in, r, input_is_parallel=True) -> A split on dim 1; linear_out (B) is a
    ColumnParallelLinear(r, out, gather_output=True) (lin_out_gather_output, line 234) -> B split on
    dim 0, not replicated.
  * the adapter output is added to the base layer's rank-local output (mcore_mixins.py 162, 391), and
    the gated fc1 chunks each rank's local output into [gate; up] halves (mcore_mixins.py 414-416), so
    each rank's fc1 B is [gate_r; up_r]: gather splits each shard in halves and puts all gates first.
  * qkv: rank-local rows are whole query groups ([q heads, k, v] per group), so B concatenates plainly.
- IA3 (InfusedAdapter, parallel_adapters.py 94-116; peft_config.py 312-334): scalers of
  kv_channels*num_query_groups // tp (key, value) and ffn_hidden_size // tp (mlp), applied to the
  rank-local key/value (mcore_mixins.py 205-215) and the rank-local fc2 input (422-424): split on dim 0.
- canonical adapters (peft_config.py 353-389; ParallelLinearAdapter with gather_output=True,
  input_is_parallel=False, in=out=hidden): linear_in is ColumnParallelLinear -> dim 0; linear_out is a
  RowParallelLinear(dim, hidden, input_is_parallel=False) -> dim 1; layer_norm is a plain (apex or
  torch) LayerNorm on the full hidden size -> replicated.
- p-tuning (PromptEncoderAdapter, parallel_adapters.py 792-913): embedding is a plain nn.Embedding ->
  replicated; first is ColumnParallelLinear(bias=True) -> weight and bias dim 0; second is
  RowParallelLinear(input_is_parallel=True, bias=True) -> weight dim 1, bias replicated; the
  inference_table buffer (persistent, saved: nlp_adapter_mixins.py 120-134) is a cache NeMo refills on
  its first eval forward (is_inference_ready is not saved), so rank 0's copy is kept unchecked. The
  adapter lives on the embedding, so only PP stage 0 holds it (a p-tuning-only later stage saves {}:
  nlp_adapter_mixins.py 245, 452-453).
Replicated tensors must be equal on every TP rank (their gradients are the same on every rank when
training is correct); if they are not there is no single TP=1 value, and gather refuses rather than
picking one.

Layer numbers in PP shards are stage-local; global = local + pp_rank * (num_layers // pp) (NeMo's
own lora_converter.py does the same and likewise assumes the even split; spec.py refuses others).
Checkpoint file names follow nemo/utils/model_utils.py 705-711 (inject_model_parallel_rank).
Tensors keep their dtype: gathering and splitting only move values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from nemo_ft.errors import InputError
from nemo_ft.peft import LORA_MODULES
from nemo_ft.export.spec import AdapterSpec, check_layout

PREFIX = "model."
_LAYER_KEY = re.compile(r"^model\.(?:module\.)?decoder\.layers\.(\d+)\.(.+)$")
_EMBEDDING_KEY = re.compile(r"^model\.(?:module\.)?(embedding\.adapter_layer\..+)$")
PTUNING_MODULE = "embedding.adapter_layer.ptuning_adapter"

# How a tensor is spread over TP ranks.
ROWS = "rows"              # split on dim 0
COLS = "cols"              # split on dim 1
GATED_ROWS = "gated_rows"  # dim 0, each rank holding [gate_r; up_r]
REPLICATED = "replicated"  # the same full tensor on every rank
CACHE = "cache"            # replicated, but a cache NeMo recomputes: rank 0's copy is kept unchecked


@dataclass(frozen=True)
class Param:
    """One adapter tensor: which scheme owns it, how TP splits it, and its full TP=1 shape."""

    scheme: str
    split: str
    shape: tuple


def shard_path(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """Where NeMo puts this rank's weights inside a .nemo (model_utils.py inject_model_parallel_rank)."""
    if tp * pp == 1:
        return "model_weights.ckpt"
    if pp == 1:
        return f"mp_rank_{tp_rank:02d}/model_weights.ckpt"
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/model_weights.ckpt"


def lora_key(layer: int, target: str, which: str) -> str:
    """NeMo's key for a LoRA tensor: which = "A" (linear_in) or "B" (linear_out)."""
    module = LORA_MODULES[target][0]
    return f"{PREFIX}decoder.layers.{layer}.{module}.{'linear_in' if which == 'A' else 'linear_out'}.weight"


def lora_shapes(spec: AdapterSpec, target: str) -> tuple:
    """Full (A, B) shapes of a LoRA target: A [r, in], B [out, r] (peft_config.py 165-241 in/out features)."""
    m, r = spec.model, spec.adapter_dim
    in_out = {
        "attention_qkv": (m.hidden_size, m.qkv_size),
        "attention_dense": (m.q_size, m.hidden_size),   # linear_proj's input is the heads' width, not hidden
        "mlp_fc1": (m.hidden_size, m.fc1_size),
        "mlp_fc2": (m.ffn_hidden_size, m.hidden_size),
    }
    fan_in, fan_out = in_out[target]
    return (r, fan_in), (fan_out, r)


def layer_params(spec: AdapterSpec) -> dict:
    """{key suffix after `decoder.layers.N.`: Param} for every per-layer tensor the spec's schemes save."""
    m = spec.model
    out: dict = {}
    if spec.has_lora:
        scheme = "qlora" if "qlora" in spec.schemes else "lora"
        for target in spec.targets:
            module, _, kind = LORA_MODULES[target]
            a_shape, b_shape = lora_shapes(spec, target)
            if kind == "column":
                b_split = GATED_ROWS if (target == "mlp_fc1" and m.gated) else ROWS
                out[f"{module}.linear_in.weight"] = Param(scheme, ROWS, a_shape)
                out[f"{module}.linear_out.weight"] = Param(scheme, b_split, b_shape)
            else:
                out[f"{module}.linear_in.weight"] = Param(scheme, COLS, a_shape)
                out[f"{module}.linear_out.weight"] = Param(scheme, ROWS, b_shape)
    if "ia3" in spec.schemes:
        out["self_attention.adapter_layer.key_infused_adapter.scalers"] = Param("ia3", ROWS, (m.kv_size,))
        out["self_attention.adapter_layer.value_infused_adapter.scalers"] = Param("ia3", ROWS, (m.kv_size,))
        # applied after the activation (mcore_mixins.py 422-424): ffn wide even when fc1 is gated
        out["mlp.adapter_layer.mlp_infused_adapter.scalers"] = Param("ia3", ROWS, (m.ffn_hidden_size,))
    if "adapter" in spec.schemes:
        dim, hidden = spec.adapter_tuning_dim, m.hidden_size
        for name in ("adapter_1", "adapter_2"):  # AdapterName.PRE_ATTN_ADAPTER / POST_ATTN_ADAPTER
            out[f"adapter_layer.{name}.linear_in.weight"] = Param("adapter", ROWS, (dim, hidden))
            out[f"adapter_layer.{name}.linear_out.weight"] = Param("adapter", COLS, (hidden, dim))
            if spec.adapter_norm:
                out[f"adapter_layer.{name}.layer_norm.weight"] = Param("adapter", REPLICATED, (hidden,))
                out[f"adapter_layer.{name}.layer_norm.bias"] = Param("adapter", REPLICATED, (hidden,))
    return out


def embedding_params(spec: AdapterSpec) -> dict:
    """{key suffix after `model.`: Param} for the p-tuning prompt encoder (first PP stage only)."""
    if "ptuning" not in spec.schemes:
        return {}
    vt, bn, emb, hidden = spec.virtual_tokens, spec.bottleneck_dim, spec.embedding_dim, spec.model.hidden_size
    p = PTUNING_MODULE
    return {
        f"{p}.embedding.weight": Param("ptuning", REPLICATED, (vt, emb)),
        f"{p}.first.weight": Param("ptuning", ROWS, (bn, emb)),
        f"{p}.first.bias": Param("ptuning", ROWS, (bn,)),
        f"{p}.second.weight": Param("ptuning", COLS, (hidden, bn)),
        f"{p}.second.bias": Param("ptuning", REPLICATED, (hidden,)),
        f"{p}.inference_table": Param("ptuning", CACHE, (vt, hidden)),
    }


def expected_keys(spec: AdapterSpec) -> dict:
    """{global key: Param} of a complete TP=1/PP=1 adapter for this spec."""
    out: dict = {}
    per_layer = layer_params(spec)
    for suffix, param in per_layer.items():
        scheme = "lora" if param.scheme == "qlora" else param.scheme
        for layer in spec.layers_of(scheme):
            out[f"{PREFIX}decoder.layers.{layer}.{suffix}"] = param
    for suffix, param in embedding_params(spec).items():
        out[PREFIX + suffix] = param
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def local_shape(param: Param, tp: int) -> tuple:
    shape = list(param.shape)
    if param.split in (ROWS, GATED_ROWS):
        shape[0] //= tp
    elif param.split == COLS:
        shape[1] //= tp
    return tuple(shape)


def _sort_key(key: str):
    m = _LAYER_KEY.match(key)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, key)


def _known_suffixes() -> dict:
    """Every per-layer suffix any exportable scheme could save -> scheme, for 'wrong scheme' messages."""
    out = {}
    for module, _, _ in LORA_MODULES.values():
        out[f"{module}.linear_in.weight"] = out[f"{module}.linear_out.weight"] = "lora"
    for name in ("key_infused_adapter", "value_infused_adapter"):
        out[f"self_attention.adapter_layer.{name}.scalers"] = "ia3"
    out["mlp.adapter_layer.mlp_infused_adapter.scalers"] = "ia3"
    for name in ("adapter_1", "adapter_2"):
        for leaf in ("linear_in.weight", "linear_out.weight", "layer_norm.weight", "layer_norm.bias"):
            out[f"adapter_layer.{name}.{leaf}"] = "adapter"
    return out


def _parse_key(key: str):
    """(stage-local layer or None, suffix) of a NeMo adapter key; None if it is not an adapter key."""
    m = _LAYER_KEY.match(key)
    if m:
        return int(m.group(1)), m.group(2)
    m = _EMBEDDING_KEY.match(key)
    if m:
        return None, m.group(1)
    return None


def gather_adapter(shards: dict, spec: AdapterSpec, tp: int | None = None, pp: int | None = None) -> dict:
    """One TP=1/PP=1 adapter {global key: array} from NeMo's per-rank PEFT shards {(tp_rank, pp_rank): state}."""
    tp = spec.tp if tp is None else tp
    pp = spec.pp if pp is None else pp
    check_layout(spec, tp, pp)
    _check_shard_set(shards, tp, pp)
    per_stage = spec.model.num_layers // pp
    per_layer, per_embedding = layer_params(spec), embedding_params(spec)
    known = _known_suffixes()
    expected = expected_keys(spec)

    # global key -> {tp_rank: (array, where)}; `where` names the shard and its own key for messages
    found: dict = {}
    for (t, p) in sorted(shards):
        path = shard_path(t, p, tp, pp)
        state = shards[(t, p)]
        if not isinstance(state, dict):
            raise InputError(f"expected a dict of tensors, got {type(state).__name__}", path=path)
        for key, value in state.items():
            if isinstance(value, dict):
                raise InputError("nested state dict (virtual pipeline chunks model_0, model_1, ...?): only plain "
                                 "per-rank adapter dicts are supported", path=path, key=key)
            parsed = _parse_key(key)
            if parsed is None:
                raise InputError("not an adapter key this exporter recognises", path=path, key=key)
            local, suffix = parsed
            if local is None:
                if suffix not in per_embedding:
                    raise InputError(_unknown_message(suffix, spec, known), path=path, key=key)
                if p != 0:
                    raise InputError(f"the p-tuning prompt encoder lives on the embedding, which only PP stage 0 "
                                     f"holds; found on pp_rank={p}", path=path, key=key)
                gkey = PREFIX + suffix
            else:
                if suffix not in per_layer:
                    raise InputError(_unknown_message(suffix, spec, known), path=path, key=key)
                if local >= per_stage:
                    raise InputError(f"layer {local} in a stage of {per_stage} layers (PP={pp}): NeMo numbers layers "
                                     f"per stage from 0; are these layer numbers already global?", path=path, key=key)
                glob = local + p * per_stage
                gkey = f"{PREFIX}decoder.layers.{glob}.{suffix}"
                if gkey not in expected:
                    raise InputError(f"global layer {glob} has no {per_layer[suffix].scheme} adapter under this "
                                     f"config's layer_selection", path=path, key=key)
            if not isinstance(value, np.ndarray):
                raise InputError(f"expected a numpy array, got {type(value).__name__} (convert tensors at the "
                                 "boundary)", path=path, key=key)
            ranks = found.setdefault(gkey, {})
            if t in ranks:
                raise InputError(f"appears twice on tp_rank={t}: also as {ranks[t][1][1]!r} in {ranks[t][1][0]} "
                                 f"(global key {gkey})", path=path, key=key)
            ranks[t] = (value, (path, key))

    missing = [k for k in expected if k not in found]
    if missing:
        p = _stage_of(missing[0], per_stage)
        raise InputError(f"missing on every TP rank of pp_rank={p} ({len(missing)} adapter tensor(s) missing in all; "
                         f"schemes {', '.join(spec.schemes)}, TP={tp}, PP={pp}; global key {missing[0]})",
                         path=shard_path(0, p, tp, pp), key=_local_key(missing[0], p, per_stage))
    out = {}
    for gkey, param in expected.items():
        ranks = found[gkey]
        p = _stage_of(gkey, per_stage)
        absent = [t for t in range(tp) if t not in ranks]
        if absent:
            raise InputError(f"missing on tp_rank(s) {absent} (present on {sorted(ranks)}, global key {gkey})",
                             path=shard_path(absent[0], p, tp, pp), key=_local_key(gkey, p, per_stage))
        out[gkey] = _join(param, [ranks[t] for t in range(tp)], tp)
    return out


def split_adapter(adapter: dict, spec: AdapterSpec, tp: int, pp: int) -> dict:
    """The per-rank shards {(tp_rank, pp_rank): state} NeMo would hold for this TP=1 adapter at TP x PP."""
    check_layout(spec, tp, pp)
    check_adapter(adapter, spec)
    per_stage = spec.model.num_layers // pp
    shards = {(t, p): {} for p in range(pp) for t in range(tp)}
    for gkey, param in expected_keys(spec).items():
        p = _stage_of(gkey, per_stage)
        local = _local_key(gkey, p, per_stage)
        for t, piece in enumerate(_cut(param, adapter[gkey], tp)):
            shards[(t, p)][local] = piece
    return shards


def check_adapter(adapter: dict, spec: AdapterSpec) -> None:
    """A TP=1 adapter must hold exactly the spec's tensors, at their full shapes."""
    expected = expected_keys(spec)
    for key in adapter:
        if key not in expected:
            raise InputError(f"not a tensor of this config's adapter (schemes {', '.join(spec.schemes)})", key=key)
    for key, param in expected.items():
        if key not in adapter:
            raise InputError("missing from the adapter", key=key)
        value = adapter[key]
        if not isinstance(value, np.ndarray):
            raise InputError(f"expected a numpy array, got {type(value).__name__}", key=key)
        if tuple(value.shape) != param.shape:
            raise InputError(f"shape {tuple(value.shape)}, expected {param.shape}", key=key)


def _check_shard_set(shards: dict, tp: int, pp: int) -> None:
    if not isinstance(shards, dict):
        raise InputError(f"expected {{(tp_rank, pp_rank): state}}, got {type(shards).__name__}")
    wanted = {(t, p) for t in range(tp) for p in range(pp)}
    for rank in shards:
        if rank not in wanted:
            raise InputError(f"unexpected shard {rank!r}: a TP={tp} x PP={pp} adapter has tp_rank 0..{tp - 1} and "
                             f"pp_rank 0..{pp - 1}")
    for t, p in sorted(wanted):
        if (t, p) not in shards:
            raise InputError(f"shard missing (tp_rank={t}, pp_rank={p}) of a TP={tp} x PP={pp} adapter",
                             path=shard_path(t, p, tp, pp))


def _unknown_message(suffix: str, spec: AdapterSpec, known: dict) -> str:
    owner = known.get(suffix)
    if owner == "lora" and spec.has_lora:
        return f"a LoRA target not in this config's target_modules ({', '.join(spec.targets)})"
    if owner:
        return f"a {owner} adapter tensor, but this config's peft_scheme is {','.join(spec.schemes)}"
    if suffix.startswith(PTUNING_MODULE):
        return f"a p-tuning tensor, but this config's peft_scheme is {','.join(spec.schemes)}"
    return "not an adapter key this exporter recognises"


def _stage_of(gkey: str, per_stage: int) -> int:
    m = _LAYER_KEY.match(gkey)
    return int(m.group(1)) // per_stage if m else 0


def _local_key(gkey: str, stage: int, per_stage: int) -> str:
    m = _LAYER_KEY.match(gkey)
    if not m:
        return gkey
    return f"{PREFIX}decoder.layers.{int(m.group(1)) - stage * per_stage}.{m.group(2)}"


def _join(param: Param, pieces: list, tp: int) -> np.ndarray:
    """Gather one tensor from its TP pieces [(array, (path, key))...], checking shape and dtype of each."""
    want = local_shape(param, tp)
    first = pieces[0][0]
    for t, (value, (path, key)) in enumerate(pieces):
        if tuple(value.shape) != want:
            others = ", ".join(f"tp_rank={i}: {tuple(v.shape)}" for i, (v, _) in enumerate(pieces))
            raise InputError(f"shape {tuple(value.shape)}, expected {want} on each of {tp} TP rank(s) for a full "
                             f"{param.shape} ({param.split}); ranks hold {others}", path=path, key=key)
        if value.dtype != first.dtype:
            raise InputError(f"dtype {value.dtype} differs from tp_rank=0's {first.dtype}", path=path, key=key)
    arrays = [value for value, _ in pieces]
    if param.split == ROWS:
        return np.concatenate(arrays, axis=0)
    if param.split == COLS:
        return np.concatenate(arrays, axis=1)
    if param.split == GATED_ROWS:
        half = want[0] // 2
        return np.concatenate([a[:half] for a in arrays] + [a[half:] for a in arrays], axis=0)
    if param.split == REPLICATED:
        for t, (value, (path, key)) in enumerate(pieces[1:], start=1):
            if not np.array_equal(value, first):
                diff = float(np.max(np.abs(value.astype(np.float64) - first.astype(np.float64))))
                raise InputError(f"replicated tensor differs between tp_rank=0 and tp_rank={t} "
                                 f"(max |diff| {diff:.3g}); "
                                 "there is no single TP=1 value to export", path=path, key=key)
        return first
    return first  # CACHE


def _cut(param: Param, full: np.ndarray, tp: int) -> list:
    if param.split == ROWS:
        return np.split(full, tp, axis=0)
    if param.split == COLS:
        return np.split(full, tp, axis=1)
    if param.split == GATED_ROWS:
        gate, up = np.split(full, 2, axis=0)
        return [np.concatenate([g, u], axis=0) for g, u in zip(np.split(gate, tp, axis=0), np.split(up, tp, axis=0))]
    return [full] * tp  # REPLICATED, CACHE: the same tensor on every rank
