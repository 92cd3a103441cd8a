"""Per-GPU memory of one training layout: weights, gradients, optimizer states, activations, buffers.

Every figure is bytes on the busiest GPU (the pipeline stage with the largest total). The formulas:

Weights, gradients, optimizer (bytes per parameter; see `Dtypes`):
- NeMo keeps params in bf16/fp16 only with `model.megatron_amp_O2=true`; otherwise params are fp32 and
  torch autocast casts each GEMM weight to 16-bit on the fly (NeMo megatron_base_model.params_dtype),
  and those 16-bit copies live from forward until backward (`autocast_copies`).
- O2 bf16 (MainParamsOptimizerWrapper, fp32_grad_accum): 2 (param) + 4 (fp32 main grad) + 4 (fp32
  master) + 8 (Adam m, v in fp32) = 18 bytes per trained parameter, Megatron's figure (Korthikanti et
  al. 2022, sec. 2). The public "7B = 14 + 14 + 56 GB" figure counts 16-bit grads and no master copy;
  `tests/unit/test_plan.py` checks that decomposition from these parts.
- distributed_fused_adam shards m, v and the master (2-byte remainders for bf16) over data parallel.
- NF4 (QLoRA): 0.5 byte per linear weight + one fp32 absmax per 64-weight block (0.0625 B/param), or
  with double quantization 8-bit absmax + one fp32 per 256 blocks (Dettmers et al. 2023, sec. 3).

Activations (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022):
per layer and micro batch the paper's GPT layer stores s*b*h*(34 + 5*a*s/h) bytes at 16-bit; with TP
and sequence parallel everything is divided by t; without SP only the 24 of 34 (and the 5as/h term)
are; selective recompute drops the 5as/h term; full recompute keeps only the layer input 2sbh. We
evaluate the same accounting term by term for the real shape (GQA K/V widths, gated MLP, no
dropout, LoRA), which reduces to exactly 34 for the paper's layer (test_plan.py checks this).
Flash/fused attention (what mcore's TE attention runs on GPU) never materializes the a*s*s scores, so
it behaves like selective recompute for that term. Under 1F1B the first pipeline stage holds
min(PP, micro batches) micro batches in flight; stage i holds min(PP - i, m).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nemo_ft.plan import shapes as S

GB = 1e9
CUDA_CONTEXT = 1.0e9  # CUDA context + cuBLAS/cuDNN workspaces: outside torch's caching allocator
NCCL_BUFFERS = 0.5e9  # communicator buffers once any TP/PP/DP group has more than one rank
NF4_BLOCK = 64
DQ_BLOCK = 256


@dataclass(frozen=True)
class Layout:
    """One parallel layout and batch shape; everything `search` varies lives here."""
    num_gpus: int
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    seq_length: int = 2048
    global_batch_size: int | None = None  # None = one micro batch per DP rank
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block (full recompute only)
    recompute_num_layers: int = 1

    @property
    def dp(self) -> int:
        return self.num_gpus // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        gbs = self.global_batch_size or self.micro_batch_size * self.dp
        return max(1, gbs // (self.micro_batch_size * self.dp))

    def describe(self) -> str:
        rc = self.recompute if self.recompute != "full" else f"full({self.recompute_method},{self.recompute_num_layers})"
        sp = "+SP" if self.sequence_parallel and self.tp > 1 else ""
        return (f"{self.num_gpus} GPU: TP{self.tp}{sp} PP{self.pp} DP{self.dp}, micro batch {self.micro_batch_size}, "
                f"seq {self.seq_length}, recompute {rc}")


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element for each kind of state, chosen from precision / megatron_amp_O2 / optimizer."""
    weight: float = 2.0  # base GEMM weights (0.5 for NF4, 1 for fp8)
    other_weight: float = 2.0  # embeddings, norms, output layer: never quantized
    trainable: float = 2.0  # trainable params (adapters, or all params in full fine-tuning)
    grad: float = 4.0
    master: float = 4.0  # fp32 copy of 16-bit trainable params, 0 when params are fp32
    adam: float = 8.0  # m and v
    activation: float = 2.0  # bytes per activation element in the paper's accounting is 16-bit
    autocast_copies: bool = False
    distributed_optimizer: bool = False
    quant_constants: float = 0.0  # bytes per quantized weight for NF4 absmax constants
    name: str = "bf16 (O2)"


@dataclass
class Mode:
    """How the runtime stores activations: NeMo/megatron-core by default, or the GPU check's torch model."""
    flash_attention: bool = True
    # Megatron's vocab-parallel cross entropy keeps fp32 softmax (4 B) and the backward adds the 16-bit
    # logits gradient and its transposed copy (2+2 B) per vocab entry per token.
    logits_bytes: float = 8.0
    # A frozen GEMM that no LoRA adapter reads still keeps its input? torch autograd does not (it saves
    # `input` only if the weight needs a grad); we assume megatron/TE do the same.
    frozen_keeps_input: bool = False


@dataclass
class MemoryPlan:
    """Per-GPU memory of the busiest pipeline stage, in bytes (GB in as_json = 1e9 bytes)."""
    layout: Layout
    dtypes: Dtypes
    weights: float
    trainable_params: int  # whole model, counted once (what the SFT stage asserts)
    grads: float
    optimizer: float
    activations: float
    buffers: float
    capacity: float | None
    quant_constants: float = 0.0  # included in weights
    adam_states: float = 0.0  # included in optimizer
    master_weights: float = 0.0  # included in optimizer
    autocast_copies: float = 0.0  # included in activations
    outside_allocator: float = 0.0  # part of buffers torch.cuda.max_memory_allocated never sees
    trainable_on_gpu: int = 0
    stage: int = 0
    model_name: str = ""
    gpu_name: str = ""
    peft: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should report: total minus context and NCCL buffers."""
        return self.total - self.outside_allocator

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def as_json(self) -> dict:
        r = lambda x: round(x / GB, 3)
        return {
            "weights_gb": r(self.weights),
            "trainable_params": int(self.trainable_params),
            "grads_gb": r(self.grads),
            "optimizer_gb": r(self.optimizer),
            "activations_gb": r(self.activations),
            "total_gb": r(self.total),
            "capacity_gb": None if self.capacity is None else r(self.capacity),
            "fits": bool(self.fits),
        }

    def as_text(self) -> str:
        g = lambda x: f"{x / GB:9.2f} GB"
        rows = [
            ("weights", self.weights, f"{self.dtypes.name}" + (f", incl. NF4 constants {self.quant_constants / GB:.2f} GB" if self.quant_constants else "")),
            ("gradients", self.grads, f"{self.trainable_on_gpu:,} trainable params on this GPU"),
            ("optimizer", self.optimizer, f"Adam m,v {self.adam_states / GB:.2f} GB + fp32 master {self.master_weights / GB:.2f} GB"
             + (" (sharded over DP)" if self.dtypes.distributed_optimizer else "")),
            ("activations", self.activations, f"{min(self.layout.pp - self.stage, self.layout.num_microbatches)} micro batch(es) in flight"
             + (f", incl. autocast weight copies {self.autocast_copies / GB:.2f} GB" if self.autocast_copies else "")),
            ("buffers", self.buffers, "CUDA context, NCCL, backward working set"),
        ]
        head = [f"nemo-ft plan: {self.model_name} peft={self.peft} on {self.gpu_name}",
                f"  layout: {self.layout.describe()}",
                f"  trainable parameters: {self.trainable_params:,}",
                f"  per GPU (pipeline stage {self.stage}, the busiest):"]
        body = [f"    {name:<12}{g(v)}   {why}" for name, v, why in rows]
        cap = "unknown" if self.capacity is None else f"{self.capacity / GB:.2f} GB"
        head_room = "" if self.capacity is None else f", headroom {(self.capacity - self.total) / GB:+.2f} GB"
        tail = [f"    {'total':<12}{g(self.total)}   capacity {cap}{head_room}",
                f"  fits: {'yes' if self.fits else 'NO'}"]
        return "\n".join(head + body + tail + [f"  note: {n}" for n in self.notes])


# ---- activations --------------------------------------------------------------------------------

def layer_activation_bytes(s: S.ModelShape, layout: Layout, *, trainable: set[str], lora_rank: int = 0,
                           lora_targets=(), mode: Mode = Mode(), recompute_scores: bool = False) -> float:
    """Bytes one decoder layer stores for one token of one micro batch, on one TP rank.

    Term by term as in Korthikanti et al. sec. 4.1 (16-bit activations, 1-byte dropout masks):
    `replicated` terms are duplicated over TP ranks unless sequence parallel shards them too.
    `trainable` names the GEMMs whose weights get gradients (they must keep their input).
    """
    h, t = s.hidden_size, layout.tp
    a = s.num_attention_heads
    keeps = lambda gemm: mode.frozen_keeps_input or gemm in trainable or gemm in lora_targets
    replicated = 2 * h  # input of the first norm
    replicated += 2 * h if keeps("attention_qkv") else 0  # norm output = QKV GEMM input
    replicated += 2 * h  # input of the second norm
    replicated += 2 * h if keeps("mlp_fc1") else 0  # norm output = FC1 input
    replicated += 2 * h if s.hidden_dropout > 0 else 0  # two residual dropout masks, 1 byte each
    replicated += 2 * lora_rank * len(lora_targets)  # LoRA's r-wide hidden (linear_in output is gathered)
    sharded = 2 * (s.q_size + s.kv_size)  # Q and K after RoPE, kept for QK^T
    sharded += 2 * s.kv_size  # V
    sharded += 2 * s.q_size  # attention output = output-projection input (flash also keeps it as O)
    if not (mode.flash_attention or recompute_scores):
        # softmax output 2as (+ dropout mask as + dropout output 2as when attention dropout is on)
        sharded += (5 if s.attention_dropout > 0 else 2) * a * layout.seq_length
    elif mode.flash_attention:
        sharded += 4 * a  # fp32 log-sum-exp per head
    sharded += 2 * s.fc1_size  # activation-function input (fused bias-SwiGLU/GeLU recompute the rest)
    sharded += 2 * s.ffn_hidden_size if keeps("mlp_fc2") else 0  # activation output = FC2 input
    sp = layout.sequence_parallel and t > 1
    return (replicated / t if sp else replicated) + sharded / t


def layer_input_bytes(s: S.ModelShape, layout: Layout) -> float:
    """Full recompute keeps only each layer's (or chunk's) input: 2sbh per token-layer, /t with SP."""
    sp = layout.sequence_parallel and layout.tp > 1
    return 2 * s.hidden_size / (layout.tp if sp else 1)


# ---- the estimate ---------------------------------------------------------------------------------

def stage_layers(s: S.ModelShape, pp: int) -> int:
    return s.num_layers // pp


def estimate_layout(s: S.ModelShape, peft, layout: Layout, dtypes: Dtypes, *, capacity: float | None = None,
                    mode: Mode = Mode()) -> MemoryPlan:
    """Memory of every pipeline stage; returns the busiest one."""
    scheme = S.peft_scheme(peft)
    full_ft = scheme == "none"
    t, p = layout.tp, layout.pp
    L = stage_layers(s, p)
    V = s.padded_vocab(t)
    h = s.hidden_size
    tokens = layout.micro_batch_size * layout.seq_length

    linear = S.layer_linear_params(s)
    layer_linear = sum(linear.values()) / t
    layer_norms = 2 * s.norm_params  # norms are replicated over TP
    emb = V * h / t + (s.max_position_embeddings * h if s.learned_positions else 0)
    out_layer = V * h / t

    targets = S.lora_targets(peft) if scheme in ("lora", "qlora") else []
    rank = S.lora_rank(peft) if targets else 0
    trainable_gemms = set(linear) if full_ft else set()

    # Trainable params that live on one stage, per TP rank. PEFT adapters are TP-sharded like their host.
    per_layer_trainable = S.trainable_per_layer(s, peft) / (1 if full_ft else t)
    if full_ft:
        per_layer_trainable = layer_linear + layer_norms
    selected = S.trainable_layers(s, peft) / s.num_layers  # layer_selection spreads over stages evenly

    best = None
    for stage in range(p):
        first, last = stage == 0, stage == p - 1
        # weights
        gemm = L * layer_linear
        other = L * layer_norms
        if first:
            other += emb
        if last:
            other += s.norm_params + (out_layer if (not s.tied_embeddings or p > 1) else 0)
        if full_ft:
            weights = (gemm + other) * dtypes.trainable
            trainable_here = gemm + other
        else:
            weights = gemm * dtypes.weight + other * dtypes.other_weight
            trainable_here = L * per_layer_trainable * selected
            if scheme == "ptuning" and first:
                trainable_here += S.ptuning_params(s, peft)
            weights += trainable_here * dtypes.trainable
        constants = 0.0 if full_ft else gemm * dtypes.quant_constants
        weights += constants

        grads = trainable_here * dtypes.grad
        shard = layout.dp if dtypes.distributed_optimizer else 1
        adam = trainable_here * dtypes.adam / shard
        master = trainable_here * dtypes.master / shard

        # activations of one micro batch on this stage
        per_token = layer_activation_bytes(s, layout, trainable=trainable_gemms, lora_rank=rank,
                                           lora_targets=targets, mode=mode,
                                           recompute_scores=layout.recompute in ("selective", "full"))
        if layout.recompute == "full":
            n = max(1, layout.recompute_num_layers)
            if layout.recompute_method == "block":
                # the first n layers of the stage keep their input only, the rest everything
                n_rc = min(n, L)
                stored = n_rc * layer_input_bytes(s, layout) + (L - n_rc) * per_token
                working = per_token if n_rc else 0
            else:
                # uniform: one checkpoint per chunk of n layers; backward rebuilds one chunk at a time
                stored = -(-L // n) * layer_input_bytes(s, layout)
                working = min(n, L) * per_token
        else:
            stored, working = L * per_token, 0
        in_flight = min(p - stage, layout.num_microbatches)
        acts = tokens * stored * in_flight + tokens * working
        if last:
            sp = layout.sequence_parallel and t > 1
            # final norm input + output-layer input (kept only when the output layer trains), then logits
            acts += tokens * (2 * h + (2 * h if full_ft else 0)) / (t if sp else 1)
            acts += tokens * V / t * mode.logits_bytes
        autocast = 0.0
        if dtypes.autocast_copies:
            # fp32 params under autocast: each GEMM weight's 16-bit copy is kept for backward. Full
            # recompute of frozen weights recasts per chunk, so only a chunk's copies are alive.
            copies_layers = L if (full_ft or layout.recompute != "full") else min(L, max(1, layout.recompute_num_layers))
            autocast = 2 * copies_layers * layer_linear + (2 * out_layer if last else 0)
            acts += autocast

        # backward working set: gradients w.r.t. one layer's activations (about one layer's stored bytes)
        buffers = tokens * per_token
        if p > 1:
            buffers += 2 * 2 * tokens * h / (t if layout.sequence_parallel and t > 1 else 1)  # p2p send/recv
        outside = CUDA_CONTEXT + (NCCL_BUFFERS if layout.num_gpus > 1 else 0)
        buffers += outside

        plan = MemoryPlan(layout=layout, dtypes=dtypes, weights=weights, trainable_params=S.count_trainable_shape(s, peft, t),
                          grads=grads, optimizer=adam + master, activations=acts, buffers=buffers, capacity=capacity,
                          quant_constants=constants, adam_states=adam, master_weights=master, autocast_copies=autocast,
                          outside_allocator=outside, trainable_on_gpu=int(round(trainable_here)), stage=stage, peft=scheme)
        if best is None or plan.total > best.total:
            best = plan
    return best
