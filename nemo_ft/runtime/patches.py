"""Every change nemo-ft makes to NeMo, megatron-core or torch, declared in one list.

The lists, each applied for one reason:
- HF_FIXES: what transformers needs beside NeMo's pins (the export stage's tokenizer conversion).
- ALIGNER_FIXES / ALIGNER_CPU_PATCHES: NeMo-Aligner 0.7.0 on our pinned stack (applied by the
  preference stages only; the CPU ones only without CUDA). Facts: ../shared/ALIGNER_RLHF.md.
- NEMO_FIXES: bugs of nemo_toolkit 2.4.1 + megatron-core 0.13.1 that bite on a GPU too (the NGC
  container included); applied everywhere, each only where the bug is present.
- CPU_PATCHES: what NeMo needs to run its real training path on a CPU (gloo, fp32); applied only
  when no CUDA device is used.
- TOKEN_MEAN_LOSS: the SFT loss as the token mean of the global batch, not NeMo's mean of per-micro-
  batch means (run.loss_per_token=true, sft's default); see the block's comment.
- RLHF_STUBS / RLHF_FIXES / RLHF_CPU_PATCHES: the REINFORCE/PPO actors and their PyTriton servers.

Each Patch names its target by dotted path; tests/test_runtime_patches.py resolves every target in
the installed stack, so an upgrade that renames or removes one fails loudly instead of silently
leaving a patch that no longer does anything. The facts behind each patch are in
../shared/NEMO_CPU.md.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Patch:
    target: str  # "package.module:attr" or "package.module:Class.attr"
    why: str
    make: Callable[[Any], Any]  # original -> replacement
    # Applied only when this returns True (checked at apply time); default always.
    when: Callable[[], bool] = lambda: True
    # The bug is the attribute's absence (a name NeMo uses but never defines without apex).
    missing_ok: bool = False

    def resolve(self):
        """(owner object, attribute name, current value). Raises if the target is gone."""
        module_name, _, attr_path = self.target.partition(":")
        owner = importlib.import_module(module_name)
        *parents, attr = attr_path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        if self.missing_ok:
            return owner, attr, getattr(owner, attr, None)
        return owner, attr, getattr(owner, attr)


_APPLIED: dict[str, Any] = {}  # target -> original, so apply is idempotent and reversible in tests


def apply(patches) -> list[str]:
    done = []
    for patch in patches:
        if patch.target in _APPLIED or not patch.when():
            continue
        owner, attr, original = patch.resolve()
        _APPLIED[patch.target] = (owner, attr, original)
        setattr(owner, attr, patch.make(original))
        done.append(patch.target)
    return done


def applied() -> list[str]:
    return list(_APPLIED)


# --------------------------------------------------------------------------- NeMo bugs (GPU too)

def _have(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # TE/apex can fail at import with much more than ImportError
        return False


def _have_apex() -> bool:
    return _have("apex.transformer") and _have("amp_C")


def _lora_attention_forward(original):
    # megatron-core 0.13 calls self_attention(..., inference_context=...) and passes
    # rotary_pos_cos/sin positionally in a new order; NeMo's mixin still takes inference_params.
    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        return original(self, hidden_states, attention_mask, key_value_states=key_value_states,
                        inference_params=inference_context if inference_context is not None else inference_params,
                        rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                        rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                        attention_bias=attention_bias, sequence_len_offset=sequence_len_offset)
    return forward


def _adapter_layer_forward(original):
    # Same mismatch for the canonical adapter's transformer-layer mixin: megatron-core 0.13's block
    # passes rotary_pos_cos/sin, attention_bias and inference_context, which it predates.
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        if rotary_pos_cos is not None or rotary_pos_sin is not None or attention_bias is not None:
            raise NotImplementedError("NeMo's canonical adapter layer cannot take rotary_pos_cos/sin (flash decode) "
                                      "or attention_bias; use LoRA for that path")
        return original(self, hidden_states, attention_mask, context=context, context_mask=context_mask,
                        rotary_pos_emb=rotary_pos_emb,
                        inference_params=inference_context if inference_context is not None else inference_params,
                        packed_seq_params=packed_seq_params)
    return forward


def _sampler_full_epoch_len(original):
    # Lightning 2.x restores batch_progress.current.ready on resume and adds it to the fetcher's
    # count (training_epoch_loop.py), but NeMo's sequential sampler also drops consumed_samples from
    # len(): the resumed epoch "ends" after one batch and the sampler restarts at consumed_samples,
    # so data repeats (or Lightning refuses val_check_interval > len). Count the whole epoch, as
    # NeMo 2's own sampler in nemo/lightning/data.py does.
    def __len__(self):
        gbs = self.global_batch_size
        return self.total_samples // gbs if self.drop_last else (self.total_samples + gbs - 1) // gbs
    return __len__


def _packed_local_attention(original):
    # NeMo's packed-sequence SFT hands attention a THD batch (one pack, cu_seqlens boundaries) that
    # only Transformer Engine's attention accepts. The obvious workaround (drop cu_seqlens) lets each
    # token attend across the examples of its pack. Two correct ways on megatron's local attention:
    # - "loop": run it once per example of the pack (its usual causal mask): cost sum(l_i^2), same
    #   arithmetic as unpacked; best on a CPU, where FLOPs dominate.
    # - "mask": one call over the whole pack with a block-diagonal causal mask: (sum l_i)^2 work but
    #   one kernel per layer instead of one per example; best on a GPU, where launches dominate.
    # NEMO_FT_PACKED_ATTENTION=loop|mask overrides the choice (tests check both agree with unpacked).
    import torch

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias)
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        t = query.size(0)
        # The attention mixin squeezed the batch dimension for THD: [t, heads, dim] -> [t, 1, heads, dim].
        q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        mode = os.environ.get("NEMO_FT_PACKED_ATTENTION") or ("mask" if query.is_cuda else "loop")
        if mode == "mask":
            # Every layer gets the same PackedSeqParams: build the mask once per batch, not per layer.
            masked = getattr(packed_seq_params, "_nemo_ft_mask", None)
            if masked is None or masked.size(-1) != t or masked.device != query.device:
                pos = torch.arange(t, device=query.device)
                segment = torch.bucketize(pos, cu[1:].to(query.device), right=True)  # example index per token
                allowed = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
                masked = (~allowed)[None, None]  # True = masked
                packed_seq_params._nemo_ft_mask = masked
            out = original(self, q, k, v, masked, attn_mask_type, attention_bias)
            return out.reshape(t, -1)
        bounds = [int(x) for x in cu.tolist()]
        if bounds[-1] < t:  # trailing padding forms a segment of its own
            bounds.append(t)
        parts = [original(self, q[a:b], k[a:b], v[a:b], None, attn_mask_type, attention_bias)
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(parts, dim=0).reshape(t, -1)
    return forward


def _packed_rope_vectorized(original):
    # Without TE's fused kernel, megatron-core applies RoPE to a packed (THD) batch one example at a
    # time: a .tolist() sync, then ~10 small kernels per example for q and again for k, in every
    # layer, forward and backward. On a GPU that launch overhead made a packed step cost more than
    # the padding it saves. Same arithmetic in one pass: each token's rotary angle is looked up at
    # its position inside its own example (token index minus its example's start).
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    def apply_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
                  mscale=1.0, cp_group=None):
        if cp_group is None or cp_group.size() != 1:  # context parallel splits examples: keep megatron's
            return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
        cu = cu_seqlens.to(device=t.device, dtype=torch.long)
        pos = torch.arange(t.size(0), device=t.device)
        start = cu[torch.bucketize(pos, cu[1:], right=True).clamp_(max=cu.numel() - 1)]
        return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[pos - start], rotary_interleaved=rotary_interleaved,
                                          multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)
    return apply_thd


def _adapter_init_by_layer(original):
    # NeMo seeds each pipeline stage differently (seed + 100 * pp_rank) and draws adapter weights in
    # layer order from that stream, so the same run at PP=2 starts from other adapter weights than
    # at PP=1 (losses drift ~0.03). Seed each layer's adapters from (seed, global layer number,
    # adapter, module) instead: the initial adapter is the same for every TP/PP layout.
    import zlib

    import torch

    def _check_and_add_adapter(self, name, module, peft_name, peft_cfg, *args, **kwargs):
        layer = getattr(module, "layer_number", None)
        if layer is None:
            return original(self, name, module, peft_name, peft_cfg, *args, **kwargs)
        seed = zlib.crc32(f"{self.cfg.get('seed', 1234)}/{layer}/{peft_name}/{name}".encode())
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return original(self, name, module, peft_name, peft_cfg, *args, **kwargs)
    return _check_and_add_adapter


def _adjust_kv_five(original):
    # megatron-core 0.13 returns 6 values (adds block_table); NeMo's mixin unpacks 5. The sixth is
    # None outside paged inference, which the LoRA training path never uses.
    def adjust(self, *args, **kwargs):
        return tuple(original(self, *args, **kwargs))[:5]
    return adjust


def _local_spec_without_te(original):
    # get_specs builds every spec eagerly, including the Transformer Engine one, so asking for the
    # local spec without TE raises NameError: TESpecProvider. Build only what was asked for.
    def get_specs(spec_name, transformer_config=None, use_te=True, hyena_cfg=None, fp8=False):
        if spec_name == "" and not use_te:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
            num_experts = transformer_config.num_moe_experts if transformer_config else None
            grouped = transformer_config.moe_grouped_gemm if transformer_config else False
            return get_gpt_layer_local_spec(num_experts, grouped)
        return original(spec_name, transformer_config, use_te, hyena_cfg, fp8)
    return get_specs


def _mcore_tp_attribute_defaults(_missing):
    # build_model imports this helper from apex only; megatron-core ships the same function.
    from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes
    return set_defaults_if_not_set_tensor_model_parallel_attributes


def _listify_model(_missing):
    # Full-parameter training's weight-decay grouping calls apex's listify_model (NameError
    # without apex); it only wraps a single module in a list.
    def listify_model(model):
        return model if isinstance(model, list) else [model]
    return listify_model


def _torch_norm(kind):
    # Weight-decay grouping exempts apex's norm classes by isinstance (NameError without apex);
    # megatron-core's local spec builds torch norms instead, which are what must be exempted.
    def make(_missing):
        import torch
        return torch.nn.RMSNorm if kind == "rms" else torch.nn.LayerNorm
    return make


def _cast_if_autocast_enabled(_missing):
    # apex's helper, imported by NeMo's fused bias-GeLU (the p-tuning prompt encoder) and friends:
    # cast the arguments to the autocast dtype when autocast is on, else pass them through.
    import torch

    def cast(*args):
        if not torch.is_autocast_enabled():
            return args
        dtype = torch.get_autocast_dtype("cuda")
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return cast


def _nemo_version_default(original):
    # NeMo parses NVIDIA_PYTORCH_VERSION unguarded outside the NGC container (TypeError on None).
    def enable(self, *args, **kwargs):
        os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")
        return original(self, *args, **kwargs)
    return enable


def _torch_clip_grad_norm(_original):
    # NeMo's clipper needs apex's multi_tensor_applier. Same semantics in plain torch: the norm of
    # the whole model's gradient, so each rank's partial sum is reduced over the model-parallel
    # group (TP and PP); duplicated (non-TP-split) parameters count once, as in Megatron.
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    @torch.no_grad()
    def clip_grad_norm_fp32(parameters, max_norm, norm_type=2, use_fsdp=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params = [p for p in parameters if p.grad is not None]
        parallel = parallel_state.model_parallel_is_initialized()
        counted = [p.grad.detach().float() for p in params if not getattr(p, "shared", False)
                   and (not parallel or param_is_not_tensor_parallel_duplicate(p))]
        total = torch.zeros(1, dtype=torch.float32, device=params[0].grad.device if params else "cpu")
        for g in counted:
            total += g.norm(2) ** 2
        if parallel:
            torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
        norm = total.sqrt().item()
        coef = float(max_norm) / (norm + 1.0e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
        return norm
    return clip_grad_norm_fp32


def _never_an_instance(name):
    # nlp_overrides imports McoreDistributedOptimizer / MegatronDistributedFusedAdam only with apex, then
    # tests isinstance(optimizer, ...) on every full-parameter checkpoint save (NameError without apex).
    # Without apex no optimizer can be one of them: a class nothing is an instance of is the truth.
    def make(_missing):
        return type(name, (), {"__doc__": f"stands in for apex's {name}, which is not installed"})
    return make


def _scalar_optimizer_state_kept(original):
    # torch's Adam keeps a 0-d `step` tensor per parameter; megatron's optim_state_to_sharding_state makes
    # every state entry a ShardedTensor shaped like its parameter and asserts ("Optimizer shape (() does
    # not match model shape"), so a full-parameter checkpoint with plain adam cannot be saved. Shard the
    # per-element state, keep scalars as plain (common) state: saved once, restored on resume.
    import torch

    def optim_state_to_sharding_state(optim_state_dict, id_to_sharded_param_map, exclude_keys=()):
        def scalar(v):
            return torch.is_tensor(v) and v.dim() == 0
        # new dicts: state_dict()'s per-parameter dicts are the live optimizer's own
        scalars = {pid: {k: v for k, v in st.items() if scalar(v)} for pid, st in optim_state_dict["state"].items()}
        optim_state_dict["state"] = {pid: {k: v for k, v in st.items() if not scalar(v)}
                                     for pid, st in optim_state_dict["state"].items()}
        original(optim_state_dict, id_to_sharded_param_map, exclude_keys)
        for pid, st in scalars.items():
            optim_state_dict["state"][pid].update(st)
    return optim_state_to_sharding_state


def _checkpointed_input_needs_grad(original):
    # Megatron's full activation checkpointing (tensor_parallel.checkpoint, and TE's) is reentrant: an
    # autograd.Function whose output needs a gradient only if an input does. With a frozen base the
    # block's input (the frozen embedding's output) needs none, so nothing inside the checkpointed
    # layers gets a gradient: LoRA trains nothing, grad norm 0.0, no error (measured on the tiny model).
    # The fix PEFT libraries use (transformers' enable_input_require_grads): make the input need one.
    def _checkpointed_forward(self, hidden_states, *args, **kwargs):
        import torch
        if torch.is_grad_enabled() and not hidden_states.requires_grad:
            hidden_states = hidden_states.detach().requires_grad_(True)
        return original(self, hidden_states, *args, **kwargs)
    return _checkpointed_forward


def _torch_norm_sequence_parallel(original):
    # megatron-core's norm without apex/TE (WrappedTorchNorm, the local spec's) asserts
    # sequence_parallel off. Under SP a norm sees this rank's sequence shard, so its weight gradient is
    # partial: apex's and TE's norms tag weight and bias `sequence_parallel` and NeMo's
    # allreduce_sequence_parallel_gradients sums every tagged gradient over the TP group. The same
    # tag on torch's norm gives the same result (a frozen norm under PEFT has no gradient to sum).
    def __new__(cls, config, *args, **kwargs):
        sp = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = sp
        for param in norm.parameters():
            param.sequence_parallel = sp
        return norm
    return staticmethod(__new__)


def _adapter_sp_without_te(original):
    # Under sequence parallelism NeMo's ParallelLinearAdapter reads transformer-engine's version
    # (PackageNotFoundError without TE) to decide whether TE's fused norm+linear already gathered
    # its input (TE >= 1.5). Without TE nothing gathered it, which is what NeMo does below TE 1.5:
    # the adapter gathers the sequence itself. So the version reads as "0" here, during __init__ only.
    import importlib.metadata as metadata

    @contextlib.contextmanager
    def no_te():
        version = metadata.version
        metadata.version = lambda name: "0" if name == "transformer-engine" else version(name)
        try:
            yield
        finally:
            metadata.version = version

    def __init__(self, *args, **kwargs):
        with no_te():
            original(self, *args, **kwargs)
    return __init__


NEMO_FIXES = [
    Patch("nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins:MCoreSelfAttentionMixin.forward",
          "LoRA attention mixin predates megatron-core 0.13's inference_context keyword",
          _lora_attention_forward),
    Patch("nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins:"
          "MCoreSelfAttentionMixin._adjust_key_value_for_inference",
          "megatron-core 0.13 returns 6 values, NeMo's LoRA mixin unpacks 5",
          _adjust_kv_five),
    Patch("nemo.collections.nlp.data.language_modeling.megatron.megatron_batch_samplers:"
          "MegatronPretrainingBatchSampler.__len__",
          "mid-epoch resume: len must count the whole epoch, else the resumed epoch ends early and data repeats",
          _sampler_full_epoch_len),
    Patch("nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins:MCoreTransformerLayerMixin.forward",
          "canonical adapter layer mixin predates megatron-core 0.13's layer keywords",
          _adapter_layer_forward),
    Patch("megatron.core.transformer.dot_product_attention:DotProductAttention.forward",
          "packed sequences need TE's THD attention; without TE mask each packed example to itself",
          _packed_local_attention, when=lambda: not _have("transformer_engine")),
    Patch("megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_thd",
          "unfused RoPE on packed batches loops over the examples (a sync and ~20 kernels each, per layer)",
          _packed_rope_vectorized),
    Patch("nemo.collections.nlp.models.language_modeling.megatron_gpt_model:is_te_min_version",
          "the packed GQA path compares TE's version unguarded (TypeError on None without TE)",
          lambda _orig: lambda *a, **k: False, when=lambda: not _have("transformer_engine")),
    Patch("nemo.collections.nlp.parts.mixins.nlp_adapter_mixins:NLPAdapterModelMixin._check_and_add_adapter",
          "adapter init depended on the pipeline stage; seed it per global layer so every layout starts equal",
          _adapter_init_by_layer),
    Patch("megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward",
          "full activation checkpointing gives no adapter a gradient when the base is frozen (grad norm 0)",
          _checkpointed_input_needs_grad),
    Patch("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
          "sequence parallelism without apex/TE: torch's norm refuses it; tagged like apex's norms instead",
          _torch_norm_sequence_parallel),
    Patch("nemo.collections.nlp.modules.common.megatron.adapters.parallel_adapters:ParallelLinearAdapter.__init__",
          "LoRA under sequence parallelism asks for transformer-engine's version (PackageNotFoundError without TE)",
          _adapter_sp_without_te, when=lambda: not _have("transformer_engine")),
    Patch("nemo.collections.nlp.models.language_modeling.megatron_gpt_model:get_specs",
          "get_specs builds the TE spec eagerly (NameError without Transformer Engine)",
          _local_spec_without_te, when=lambda: not _have("transformer_engine")),
    Patch("nemo.collections.nlp.modules.common.megatron.build_model:set_defaults_if_not_set_tensor_model_parallel_attributes",
          "build_model imports this only from apex (NameError without apex)",
          _mcore_tp_attribute_defaults, when=lambda: not _have_apex(), missing_ok=True),
    Patch("nemo.collections.nlp.modules.common.megatron.utils:listify_model",
          "weight-decay param groups (full fine-tuning) use apex's listify_model (NameError without apex)",
          _listify_model, when=lambda: not _have_apex(), missing_ok=True),
    *[Patch(f"nemo.collections.nlp.modules.common.megatron.utils:{name}",
            "weight-decay param groups (full fine-tuning) exempt apex norms by class (NameError without apex)",
            _torch_norm(kind), when=lambda: not _have_apex(), missing_ok=True)
      for name, kind in (("FusedLayerNorm", "ln"), ("FastLayerNorm", "ln"), ("MixedFusedRMSNorm", "rms"))],
    *[Patch(f"nemo.collections.nlp.modules.common.megatron.{module}:_cast_if_autocast_enabled",
            "fused bias kernels (p-tuning's prompt encoder) call apex's autocast helper (NameError without apex)",
            _cast_if_autocast_enabled, when=lambda: not _have_apex(), missing_ok=True)
      for module in ("fused_bias_gelu", "fused_bias_geglu", "fused_bias_dropout_add")],
    Patch("nemo.collections.nlp.models.language_modeling.megatron_base_model:MegatronBaseModel._enable_nvidia_optimizations",
          "NVIDIA_PYTORCH_VERSION unset -> TypeError outside the NGC container",
          _nemo_version_default),
    *[Patch(f"nemo.collections.nlp.parts.nlp_overrides:{name}",
            "full-parameter checkpoint saves test isinstance against apex-only optimizer classes (NameError)",
            _never_an_instance(name), when=lambda: not _have_apex(), missing_ok=True)
      for name in ("McoreDistributedOptimizer", "MegatronDistributedFusedAdam")],
    Patch("nemo.collections.nlp.parts.nlp_overrides:optim_state_to_sharding_state",
          "plain torch Adam's 0-d step state cannot be sharded: full-parameter checkpoints fail to save",
          _scalar_optimizer_state_kept),
    Patch("nemo.collections.nlp.parts.nlp_overrides:HAVE_APEX",
          "the Megatron strategy refuses to start without apex, though the PEFT path never uses it",
          lambda _orig: True, when=lambda: not _have_apex()),
    Patch("nemo.collections.nlp.models.language_modeling.megatron_base_model:clip_grad_norm_fp32",
          "NeMo's gradient clipper needs apex's multi_tensor_applier",
          _torch_clip_grad_norm, when=lambda: not _have_apex()),
]


# --------------------------------------------------------------------------- token-mean loss
# NeMo's SFT loss for a step is the mean over micro batches of each micro batch's own token mean
# (megatron_gpt_model loss_func divides by the micro batch's loss tokens; Megatron's schedule divides
# by the number of micro batches; DP averages). A micro batch with 3 loss tokens then weighs as much
# as one with 30, and the step's loss and gradient depend on how the global batch is cut: its
# MegatronPretrainingBatchSampler deals a global batch out to DP ranks by stride, so DP=2 puts other
# samples together than DP=1 and trains another curve from the same data (measured: step-1 loss
# 5.50 at DP=1 vs 5.72 at DP=2, micro batch 2, global batch 8). The gradient-accumulation bug other
# trainers shipped. With run.loss_per_token=true (the default) each micro batch's token sum is divided
# by the global batch's loss tokens / (micro batches x DP) instead, so the mean NeMo then takes is the
# token mean of the whole global batch: one loss for any DP, micro batch size or accumulation, and
# no 0/0 NaN for a micro batch without loss tokens. megatron-core's calculate_per_token_loss does
# this for its own schedules; NeMo 2.4.1's SFT model does not pass it through.

def _global_token_denominator(original):
    import itertools

    import torch

    def fwd_bwd_step(self, dataloader_iter, forward_only, first_val_step=None):
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        # NeMo's own first line takes (batch, idx, dataloader_idx) from Lightning's fetcher, or the batch
        # from a plain iterator: it gets the batch back below, in front of the rest.
        item = next(dataloader_iter)
        batch = item[0] if isinstance(item, tuple) else item
        self._nemo_ft_tokens_per_ub = None
        # NeMo's validation without validation_drop_last sums loss x tokens itself: left as it is.
        if not forward_only or self.validation_drop_last:
            dp = parallel_state.get_data_parallel_world_size()
            tokens = batch["loss_mask"].sum().to(dtype=torch.float64)
            if dp > 1:  # one all-reduce of one number per step (the loss mask is on the CPU until get_batch)
                group = parallel_state.get_data_parallel_group()
                if torch.distributed.get_backend(group) == "nccl":
                    tokens = tokens.cuda()
                torch.distributed.all_reduce(tokens, group=group)
            tokens = tokens.item()
            if tokens > 0:
                self._nemo_ft_tokens_per_ub = tokens / (get_num_microbatches() * dp)
        try:
            return original(self, itertools.chain([batch], dataloader_iter), forward_only, first_val_step)
        finally:
            self._nemo_ft_tokens_per_ub = None
    return fwd_bwd_step


def _loss_over_global_tokens(original):
    def loss_func(self, loss_mask, num_valid_tokens_in_ub, output_tensor):
        per_ub = getattr(self, "_nemo_ft_tokens_per_ub", None)
        return original(self, loss_mask, num_valid_tokens_in_ub if per_ub is None else per_ub, output_tensor)
    return loss_func


TOKEN_MEAN_LOSS = [
    Patch("nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model:MegatronGPTSFTModel.fwd_bwd_step",
          "count the global batch's loss tokens (all DP ranks) before its micro batches run",
          _global_token_denominator),
    Patch("nemo.collections.nlp.models.language_modeling.megatron_gpt_model:MegatronGPTModel.loss_func",
          "divide each micro batch's token sum by the global batch's tokens per micro batch, not its own",
          _loss_over_global_tokens),
]


# --------------------------------------------------------------------------- CPU only

def _cpu_device(_original):
    import torch
    return lambda *a, **k: torch.device("cpu")


def _noop(_original):
    return lambda *a, **k: None


def _identity_cuda(_original):
    # Tensor.cuda / Module.cuda keep tensors where they are (on the CPU).
    def cuda(self, *args, **kwargs):
        return self
    return cuda


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_rng_get(_original):
    import torch
    return lambda *a, **k: torch.get_rng_state()


def _cpu_rng_set(_original):
    import torch

    def set_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)
    return set_state


def _cpu_manual_seed(_original):
    import torch

    def manual_seed(seed, *a, **k):
        torch.manual_seed(seed)
    return manual_seed


def _on_cpu(original):
    # A few megatron-core functions create tensors with a literal device="cuda". Run them under a
    # torch function mode that sends those factory calls to the CPU; nothing else changes.
    import functools

    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    def outside_the_mode(step):
        # The model's forward (the schedules' forward_step_func) runs with the mode off: under it every
        # torch call of the forward went through __torch_function__ in Python, ~1/3 of a tiny-model step
        # (251k calls in 300 steps, profiled); the forward builds no tensor on a literal "cuda" device.
        @functools.wraps(step)
        def forward_step(*args, **kwargs):
            from torch.overrides import _pop_mode_temporarily
            with _pop_mode_temporarily():
                return step(*args, **kwargs)
        return forward_step

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if "forward_step_func" in kwargs:
            kwargs["forward_step_func"] = outside_the_mode(kwargs["forward_step_func"])
        with CudaToCpu():
            return original(*args, **kwargs)
    return wrapper


def _seed_tracker_too(original):
    # Without a GPU NeMo skips seeding megatron-core's RNG tracker, so dropout/init draws differ
    # from run to run (and from the GPU path). Seed it the same way the GPU path does.
    def _set_random_seed(seed_):
        original(seed_)
        from megatron.core import tensor_parallel
        from megatron.core.parallel_state import get_pipeline_model_parallel_rank
        tensor_parallel.model_parallel_cuda_manual_seed(seed_ + 100 * get_pipeline_model_parallel_rank())
    return _set_random_seed


CPU_PATCHES = [
    Patch("torch:Tensor.cuda", "keep tensors on the CPU", _identity_cuda),
    Patch("torch.nn:Module.cuda", "keep modules on the CPU", _identity_cuda),
    Patch("lightning.fabric.utilities.device_dtype_mixin:_DeviceDtypeModuleMixin.cuda",
          "NeMo's generate calls self.cuda() on the Lightning module, which asks torch.device('cuda', index)",
          _identity_cuda),
    Patch("torch.cuda:current_device", "device=torch.cuda.current_device() -> cpu", _cpu_device),
    Patch("torch.cuda:synchronize", "pipeline schedules synchronize the device", _noop),
    Patch("torch.cuda:LongTensor", "NeMo builds index tensors with torch.cuda.LongTensor", lambda _o: __import__("torch").LongTensor),
    Patch("torch.cuda:FloatTensor", "NeMo's generate sends its settings as a torch.cuda.FloatTensor on every call",
          lambda _o: __import__("torch").FloatTensor),
    Patch("torch.cuda:ByteTensor", "NeMo's generate marks finished rows with torch.cuda.ByteTensor (PP > 1)",
          lambda _o: __import__("torch").ByteTensor),
    Patch("torch.cuda:Stream", "NeMo/megatron create side streams", lambda _o: _NullStream),
    Patch("torch.cuda:stream", "stream context manager", lambda _o: lambda *a, **k: contextlib.nullcontext()),
    Patch("torch.cuda:current_stream", "current stream", lambda _o: lambda *a, **k: _NullStream()),
    Patch("torch.cuda:get_rng_state", "CUDA RNG state -> CPU RNG state", _cpu_rng_get),
    Patch("torch.cuda:set_rng_state", "CUDA RNG state -> CPU RNG state", _cpu_rng_set),
    Patch("torch.cuda:manual_seed", "CUDA seeding -> CPU seeding", _cpu_manual_seed),
    Patch("torch.cuda:empty_cache", "no allocator cache on CPU", _noop),
    Patch("torch.cuda:reset_peak_memory_stats", "no allocator on CPU", _noop),
    Patch("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
          "megatron-core's RNG tracker saves CUDA RNG state; without this, runs finish but losses quietly differ",
          _cpu_rng_get),
    Patch("megatron.core.tensor_parallel.random:_set_cuda_rng_state",
          "megatron-core's RNG tracker restores CUDA RNG state",
          _cpu_rng_set),
    Patch("megatron.core.fusions.fused_softmax:get_default_causal_mask",
          "hard-coded device='cuda' in the causal mask", _on_cpu),
    Patch("megatron.core.pipeline_parallel.schedules:forward_backward_no_pipelining",
          "hard-coded device='cuda' for the token count", _on_cpu),
    Patch("megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_without_interleaving",
          "hard-coded device='cuda' (PP>1)", _on_cpu),
    Patch("megatron.core.tensor_parallel:broadcast_data",
          "hard-coded device='cuda' when broadcasting a batch over TP ranks", _on_cpu),
    Patch("nemo.collections.nlp.modules.common.megatron.megatron_init:_set_random_seed",
          "NeMo seeds megatron-core's RNG tracker only when a GPU is present", _seed_tracker_too),
]


# --------------------------------------------------------------------------- transformers beside NeMo's pins

def _transformers_own_pb2(_original):
    # transformers converts a SentencePiece model to its fast tokenizer.json by parsing the model's
    # protobuf with sentencepiece's bundled sentencepiece_model_pb2, which sentencepiece 0.2.x generated
    # for a newer protobuf than NeMo's pin (protobuf 5.29: "Detected incompatible Protobuf Gencode/Runtime
    # versions"). transformers ships the same message definitions generated for protobuf >= 4: use those.
    def import_protobuf(error_message=""):
        from transformers.utils import sentencepiece_model_pb2_new
        return sentencepiece_model_pb2_new
    return import_protobuf


HF_FIXES = [
    Patch("transformers.convert_slow_tokenizer:import_protobuf",
          "sentencepiece's bundled pb2 needs a newer protobuf than NeMo pins; transformers has its own",
          _transformers_own_pb2),
]


# --------------------------------------------------------------------------- NeMo-Aligner 0.7.0

def _specs_without_te(original):
    # The reward model calls get_specs(spec_name, config) without use_te, i.e. use_te=True: the TE spec,
    # NameError without Transformer Engine. Ask for the local spec (NEMO_FIXES' get_specs builds only it).
    def get_specs(spec_name, transformer_config=None, use_te=True, *args, **kwargs):
        from nemo.collections.nlp.models.language_modeling import megatron_gpt_model
        return megatron_gpt_model.get_specs(spec_name, transformer_config, False, *args, **kwargs)
    return get_specs


ALIGNER_FIXES = [
    Patch("nemo_aligner.models.nlp.gpt.megatron_gpt_reward_model:get_specs",
          "the reward model builds the Transformer Engine spec whatever use_te says (NameError without TE)",
          _specs_without_te, when=lambda: not _have("transformer_engine")),
    Patch("nemo_aligner.utils.train_utils:clip_grad_norm_fp32",
          "Aligner's clip_gradients imports NeMo's apex clipper by name (multi_tensor_applier)",
          _torch_clip_grad_norm, when=lambda: not _have_apex()),
]

ALIGNER_CPU_PATCHES = [
    Patch("nemo_aligner.utils.distributed:Timer.is_finished",
          "the run timer broadcasts a device='cuda' tensor every step (DPO/RM/PPO trainers)", _on_cpu),
]


# --------------------------------------------------------------------------- NeMo-Aligner 0.7.0 RLHF (REINFORCE, PPO)

# The actor's client timeouts (seconds), set by the RLHF stages from their config before a client exists.
RLHF_TIMEOUTS = {"init_s": 60.0, "inference_s": 600.0}


def _client_timeouts(_original):
    # HTTPCommunicator.add_server_by_name hard-codes FuturesModelClient(init_timeout_s=6000,
    # inference_timeout_s=600000): a wrong port waits 100 minutes (Aligner issue #58). Same client, our
    # timeouts; the stages also poll the servers' readiness themselves before the first request.
    def add_server_by_name(self, server_name, ip="localhost", port=5555):
        from pytriton.client import FuturesModelClient

        client = FuturesModelClient(f"http://{ip}:{port}", server_name, init_timeout_s=RLHF_TIMEOUTS["init_s"],
                                    inference_timeout_s=RLHF_TIMEOUTS["inference_s"])
        self.connections[server_name] = (ip, port, client)
    return add_server_by_name


def _rebalance_with_1d_count(_original):
    # rebalance_nd_tensor all-gathers a 0-d sample count; gloo refuses it ("ProcessGroupGloo::allgather:
    # invalid tensor size at index 0 (expected (), got (1))"). The same gather with a 1-element count.
    def rebalance_nd_tensor(tensor, group):
        import torch
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, torch.tensor([tensor.size(0)], dtype=torch.int64), group=group)
        counts = torch.cat(counts)
        out = torch.zeros(int(counts.sum()), *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        out.tensor_split(counts.cumsum(0)[:-1])[dist.get_rank(group=group)].copy_(tensor)
        dist.all_reduce(out, group=group)
        return out
    return rebalance_nd_tensor


def _rebalanced(_original):
    from nemo_aligner.utils import distributed
    return distributed.rebalance_nd_tensor  # the patched one (applied first, see RLHF_CPU_PATCHES)


@dataclass(frozen=True)
class Stub:
    """A module that cannot be imported on this stack, replaced by a stand-in before anything imports it."""
    module: str
    why: str
    make: Callable[[], Any]  # () -> the stand-in module
    when: Callable[[], bool] = lambda: True


def _trt_llm_stub():
    # nemo_aligner/utils/trt_llm.py imports tensorrt_llm unguarded, and both actor modules import it at
    # module level, so the REINFORCE/PPO actors cannot even be imported without TensorRT-LLM. Generation
    # then goes through NeMo's own generate (trt_llm.enable=false, checked up front by the stages).
    import types

    mod = types.ModuleType("nemo_aligner.utils.trt_llm")
    mod.__doc__ = "nemo-ft stand-in: TensorRT-LLM is not installed (see nemo_ft.runtime.patches.RLHF_STUBS)"

    class GPTGenerateTRTLLM:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("trt_llm.enable=true needs TensorRT-LLM (NeMo-Aligner's NGC container); it is not "
                               "installed here: set trainer.<algorithm>.trt_llm.enable=false")

    mod.GPTGenerateTRTLLM = GPTGenerateTRTLLM
    mod.HAVE_TRTLLM = False
    return mod


RLHF_STUBS = [
    Stub("nemo_aligner.utils.trt_llm", "imports tensorrt_llm unguarded; the REINFORCE and PPO actors import it",
         _trt_llm_stub, when=lambda: not _have("tensorrt_llm")),
]

RLHF_FIXES = [
    Patch("nemo_aligner.servers.http_communicator:HTTPCommunicator.add_server_by_name",
          "the actor's clients wait 6000 s for a server and 600000 s for an answer (Aligner #58)", _client_timeouts),
]

def _unpinned_state_copy(original):
    # copy_model_states_to_cpu allocates its CPU copies with pin_memory=True, which raises without an
    # accelerator ("no pinned memory allocator"). It only allocates the names missing from cpu_dict: the
    # missing ones are given here, unpinned, and Aligner's own function does the copy.
    def copy_model_states_to_cpu(model, cpu_dict=None, *args, **kwargs):
        import torch

        cpu_dict = {} if cpu_dict is None else cpu_dict
        for name, item in model.state_dict().items():
            if isinstance(item, torch.Tensor) and name not in cpu_dict:
                cpu_dict[name] = torch.empty(item.size(), dtype=item.dtype, layout=item.layout, device="cpu")
        return original(model, cpu_dict, *args, **kwargs)
    return copy_model_states_to_cpu


RLHF_CPU_PATCHES = [
    Patch("nemo_aligner.utils.utils:copy_model_states_to_cpu",
          "pin_memory=True raises without an accelerator (PPO critic init, the combined critic/RM swap)",
          _unpinned_state_copy),
    Patch("nemo_aligner.models.nlp.gpt.megatron_gpt_critic:copy_model_states_to_cpu",
          "the critic module imports the name before it could be patched", _unpinned_state_copy),
    Patch("nemo_aligner.utils.distributed:rebalance_nd_tensor",
          "all-gathers a 0-d count, which gloo refuses (rollout batches are rebalanced over DP)",
          _rebalance_with_1d_count),
    Patch("nemo_aligner.algorithms.reinforce:rebalance_nd_tensor",
          "reinforce.py imports the name before it could be patched", _rebalanced),
]


def install_stubs(stubs) -> list[str]:
    import sys

    done = []
    for stub in stubs:
        if stub.module in sys.modules or not stub.when():
            continue
        sys.modules[stub.module] = stub.make()
        parent, _, name = stub.module.rpartition(".")
        setattr(importlib.import_module(parent), name, sys.modules[stub.module])
        done.append(stub.module)
    return done
