"""From a composed config to a MemoryPlan, a ranked list of layouts that fit, and the nearest one that fits.

Reads NeMo's own keys (model.*, model.peft.*, model.optim.name, trainer.*) plus the plan stage's plain
top-level overrides (num_gpus, seq_length, micro_batch_size, precision, gpu), validates them with
ConfigError naming the key, and hands plain numbers to nemo_ft.plan.memory.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from nemo_ft.errors import ConfigError
from nemo_ft.paths import CONF_DIR
from nemo_ft.plan import memory as M
from nemo_ft.plan import shapes as S
from nemo_ft.plan.shapes import _get

HALF = {"16", "bf16", "fp16", "16-mixed", "bf16-mixed", "bf16-true", "16-true"}
FULL = {"32", "fp32", "32-true"}
ADAMS = {"fused_adam", "adam", "adamw", "distributed_fused_adam", "mcore_distributed_optim"}
RECOMPUTE = {None: "none", "none": "none", "selective": "selective", "full": "full"}


def _model(cfg):
    model = _get(cfg, "model")
    if model is None:
        raise ConfigError("model", "no model section: pick a shape with model=llama3_8b (see conf/model/)")
    return model


def gpu_spec(cfg) -> dict | None:
    """The `gpu` group (conf/gpu/<name>.yaml) or a name of one; None when the config names no GPU."""
    gpu = _get(cfg, "gpu")
    if gpu is None:
        return None
    if isinstance(gpu, str):
        path = Path(CONF_DIR) / "gpu" / f"{gpu}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError("gpu", f"unknown GPU {gpu!r}; one of {', '.join(known)}")
        import yaml
        gpu = yaml.safe_load(path.read_text())
    if _get(gpu, "memory_gb") is None:
        raise ConfigError("gpu.memory_gb", "the GPU's capacity in GB (1e9 bytes) is required")
    return {k: gpu[k] for k in gpu}


def dtypes_from_config(cfg, scheme: str) -> tuple[M.Dtypes, list[str]]:
    model, notes = _model(cfg), []
    override = _get(cfg, "precision")
    trainer_precision = str(_get(_get(cfg, "trainer"), "precision", "bf16-mixed")).lower()
    precision = str(override).lower() if override is not None else trainer_precision
    optim = str(_get(_get(model, "optim"), "name", "fused_adam"))
    if optim not in ADAMS:
        raise ConfigError("model.optim.name", f"the planner sizes Adam-family optimizers only ({', '.join(sorted(ADAMS))}), got {optim!r}")
    distributed = optim in ("distributed_fused_adam", "mcore_distributed_optim")
    if distributed and scheme != "none":
        raise ConfigError("model.optim.name", "PEFT needs fused_adam: NeMo's distributed optimizer does not support frozen params")
    if precision not in HALF | FULL | {"fp8"}:
        raise ConfigError("precision" if override is not None else "trainer.precision",
                          f"{precision!r} is not one of bf16, fp16, fp8, fp32 (or NeMo's 16-mixed / bf16-mixed / 32)")

    # NeMo builds params in 16-bit only with megatron_amp_O2 (megatron_base_model.params_dtype); a plain
    # `precision=bf16` override means "16-bit params", i.e. as O2.
    o2 = bool(_get(model, "megatron_amp_O2", False)) or override is not None
    if precision in FULL:
        d = M.Dtypes(weight=4, other_weight=4, trainable=4, grad=4, master=0, adam=8, name="fp32")
    elif o2:
        # O2: 16-bit params, fp32 main grads (fp32_grad_accum), fp32 master, fp32 m and v.
        d = M.Dtypes(name=f"{'fp16' if '16' == precision.split('-')[0].lstrip('fp') else 'bf16'} params (O2)")
        if precision == "fp8":
            # FP8 storage of the frozen GEMM weights (e.g. an FP8-quantized base); trained weights stay bf16
            # because TE's FP8 training keeps 16-bit weights and only casts them per GEMM.
            d = replace(d, weight=1 if scheme != "none" else 2, name="fp8 GEMM weights, bf16 rest")
            if scheme == "none":
                notes.append("precision=fp8 with full fine-tuning keeps bf16 weights (TE casts per GEMM); sized as bf16")
    else:
        d = M.Dtypes(weight=4, other_weight=4, trainable=4, grad=4, master=0, adam=8, autocast_copies=True,
                     name="fp32 params + autocast")
        notes.append("model.megatron_amp_O2=false: NeMo keeps fp32 params and autocasts; "
                     "model.megatron_amp_O2=true halves the weights")
    if distributed:
        # apex DistributedFusedAdam: m, v and master sharded over DP; bf16 O2 stores only the 16-bit
        # remainders of the fp32 master (store_param_remainders), fp32 params need no master at all.
        d = replace(d, distributed_optimizer=True, master=2 if d.master else 0)
    if scheme == "qlora":
        double_quant = bool(_get(_get(cfg, "plan"), "double_quant", True))
        constants = (1 / M.NF4_BLOCK + 4 / (M.NF4_BLOCK * M.DQ_BLOCK)) if double_quant else 4 / M.NF4_BLOCK
        d = replace(d, weight=0.5, quant_constants=constants,
                    name=f"NF4 GEMM weights ({'double-quantized' if double_quant else 'fp32'} absmax), {d.name} rest")
    return d, notes


def layout_from_config(cfg, s: S.ModelShape) -> M.Layout:
    model, trainer = _model(cfg), _get(cfg, "trainer")
    tp = int(_get(model, "tensor_model_parallel_size", 1))
    pp = int(_get(model, "pipeline_model_parallel_size", 1))
    devices = _get(trainer, "devices", 1)
    devices = 1 if devices in ("auto", -1) else int(devices)
    num_gpus = int(_get(cfg, "num_gpus", devices * int(_get(trainer, "num_nodes", 1))))
    mbs = int(_get(cfg, "micro_batch_size", _get(model, "micro_batch_size", 1)))
    train_ds = _get(_get(model, "data"), "train_ds")
    seq = int(_get(cfg, "seq_length", _get(train_ds, "max_seq_length", s.seq_length)))
    gbs = _get(model, "global_batch_size")
    granularity = _get(model, "activations_checkpoint_granularity")
    if granularity not in RECOMPUTE:
        raise ConfigError("model.activations_checkpoint_granularity", f"{granularity!r} is not null, selective or full")
    return M.Layout(
        num_gpus=num_gpus, tp=tp, pp=pp, micro_batch_size=mbs, seq_length=seq,
        global_batch_size=None if gbs is None else int(gbs),
        sequence_parallel=bool(_get(model, "sequence_parallel", False)),
        recompute=RECOMPUTE[granularity],
        recompute_method=str(_get(model, "activations_checkpoint_method", "uniform")),
        recompute_num_layers=int(_get(model, "activations_checkpoint_num_layers", 1)),
    )


def layout_problem(s: S.ModelShape, peft, layout: M.Layout) -> tuple[str, str] | None:
    """(key, message) for the first thing that makes a layout impossible, else None."""
    t, p = layout.tp, layout.pp
    if t < 1 or p < 1 or layout.micro_batch_size < 1 or layout.seq_length < 1 or layout.num_gpus < 1:
        return "model.tensor_model_parallel_size", "TP, PP, num_gpus, micro_batch_size and seq_length must be >= 1"
    for what, n in (("num_attention_heads", s.num_attention_heads), ("num_query_groups", s.num_query_groups),
                    ("ffn_hidden_size", s.ffn_hidden_size)):
        if n % t:
            return "model.tensor_model_parallel_size", f"TP={t} does not divide {what}={n}"
    if S.peft_scheme(peft) in ("lora", "qlora") and S.lora_rank(peft) % t:
        return "model.peft.lora_tuning.adapter_dim", f"LoRA rank {S.lora_rank(peft)} is not divisible by TP={t}"
    if s.num_layers % p:
        return "model.pipeline_model_parallel_size", f"PP={p} does not divide num_layers={s.num_layers}"
    if layout.num_gpus % (t * p):
        return "num_gpus", f"{layout.num_gpus} GPUs are not a multiple of TP*PP={t * p}"
    gbs = layout.global_batch_size
    if gbs is not None and gbs % (layout.micro_batch_size * layout.dp):
        return "model.global_batch_size", (f"{gbs} is not divisible by micro_batch_size*DP="
                                           f"{layout.micro_batch_size}*{layout.dp}")
    return None


def _setup(cfg):
    model = _model(cfg)
    s = S.model_shape(model)
    peft = _get(model, "peft", {"peft_scheme": "none"})
    scheme = S.peft_scheme(peft)
    layout = layout_from_config(cfg, s)
    problem = layout_problem(s, peft, layout)
    if problem:
        raise ConfigError(*problem)
    dtypes, notes = dtypes_from_config(cfg, scheme)
    gpu = gpu_spec(cfg)
    mode = M.Mode(flash_attention=bool(_get(_get(cfg, "plan"), "flash_attention", True)))
    if layout.seq_length > s.max_position_embeddings:
        notes.append(f"seq_length {layout.seq_length} exceeds max_position_embeddings {s.max_position_embeddings}")
    return s, peft, layout, dtypes, gpu, mode, notes


def _plan(s, peft, layout, dtypes, gpu, mode, notes=(), name="") -> M.MemoryPlan:
    capacity = None if gpu is None else float(gpu["memory_gb"]) * M.GB
    plan = M.estimate_layout(s, peft, layout, dtypes, capacity=capacity, mode=mode)
    plan.model_name, plan.gpu_name = name, ("unknown GPU" if gpu is None else str(gpu.get("name", "?")))
    plan.notes.extend(notes)
    return plan


def _model_name(cfg) -> str:
    model = _model(cfg)
    return str(_get(model, "name", f"{S.model_shape(model).num_layers}-layer h={_get(model, 'hidden_size')}"))


def estimate(cfg) -> M.MemoryPlan:
    """Per-GPU memory of the configured layout (busiest pipeline stage)."""
    s, peft, layout, dtypes, gpu, mode, notes = _setup(cfg)
    return _plan(s, peft, layout, dtypes, gpu, mode, notes, _model_name(cfg))


def count_trainable(cfg) -> int:
    """Exact trainable parameter count of the whole model under the configured PEFT scheme."""
    model = _model(cfg)
    s = S.model_shape(model)
    return S.count_trainable_shape(s, _get(model, "peft", {"peft_scheme": "none"}),
                                   int(_get(model, "tensor_model_parallel_size", 1)))


# ---- search -----------------------------------------------------------------------------------------

def throughput_score(layout: M.Layout, gpu: dict | None) -> float:
    """A relative, unitless ranking heuristic (higher is better), never a step-time prediction.

    - PP bubble under 1F1B: (p-1)/(m+p-1) of the step is idle (Narayanan et al. 2021).
    - TP all-reduces every layer: cheap over NVLink, expensive over PCIe, very expensive across nodes.
    - full recompute reruns the forward (~+33% compute); selective recompute only attention (~+3%).
    - small micro batches run small GEMMs: tokens/(tokens+1024) as a saturating efficiency.
    """
    per_node = int((gpu or {}).get("gpus_per_node", 8))
    nvlink = bool((gpu or {}).get("nvlink", (gpu or {}).get("name", "").startswith(("a100", "h100", "h200"))))
    m, p = layout.num_microbatches, layout.pp
    score = 1 - (p - 1) / (m + p - 1)
    score /= 1 + (0.05 if nvlink else 0.2) * math.log2(layout.tp)
    if layout.tp > per_node:
        score *= 0.3
    score /= {"none": 1.0, "selective": 1.03, "full": 1.33}[layout.recompute]
    tokens = layout.micro_batch_size * layout.seq_length
    return score * tokens / (tokens + 1024)


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= limit and n % d == 0]


def candidate_layouts(s: S.ModelShape, peft, base: M.Layout, num_gpus: int | None = None,
                      flash_attention: bool = True) -> list[M.Layout]:
    n = num_gpus or base.num_gpus
    # With flash attention selective recompute saves nothing the planner can see; leave it out.
    recomputes = ("none", "full") if flash_attention else ("none", "selective", "full")
    out = []
    for tp in _powers_of_two_dividing(n, 16):
        for pp in [d for d in range(1, n // tp + 1) if (n // tp) % d == 0]:
            for mbs in (1, 2, 4, 8):
                for rc in recomputes:
                    cand = replace(base, num_gpus=n, tp=tp, pp=pp, micro_batch_size=mbs, sequence_parallel=tp > 1,
                                   recompute=rc, recompute_method="uniform", recompute_num_layers=1)
                    if base.global_batch_size is None:
                        cand = replace(cand, global_batch_size=None)
                    if layout_problem(s, peft, cand) is None:
                        out.append(cand)
    return out


def search(cfg, num_gpus: int | None = None) -> list[M.MemoryPlan]:
    """Layouts (TP, PP, micro batch, recompute) on `num_gpus` that fit, best-ranked first."""
    s, peft, layout, dtypes, gpu, mode, _ = _setup(cfg)
    candidates = candidate_layouts(s, peft, layout, num_gpus, mode.flash_attention)
    plans = [_plan(s, peft, c, dtypes, gpu, mode, name=_model_name(cfg)) for c in candidates]
    fitting = [p for p in plans if p.fits]
    return sorted(fitting, key=lambda p: (-throughput_score(p.layout, gpu), p.total))


def _distance(a: M.Layout, b: M.Layout) -> tuple:
    changed = sum((a.tp != b.tp, a.pp != b.pp, a.micro_batch_size != b.micro_batch_size, a.recompute != b.recompute))
    return (a.num_gpus != b.num_gpus, changed)


def nearest_fit(cfg) -> M.MemoryPlan | None:
    """The fitting layout closest to the configured one: same GPU count first, fewest knobs changed,
    then the best-ranked; with no fit on this many GPUs, the smallest multiple of it that has one."""
    s, peft, layout, dtypes, gpu, mode, _ = _setup(cfg)
    n = layout.num_gpus
    while n <= 4096:
        fits = search(cfg, n)
        if fits:
            return min(fits, key=lambda p: (_distance(p.layout, layout), -throughput_score(p.layout, gpu)))
        n *= 2
    return None


def check_fits(cfg) -> tuple[bool, str]:
    """(fits, message): the breakdown, and when it does not fit, the nearest layout that does."""
    plan = estimate(cfg)
    return plan.fits, plan.as_text() if plan.fits else plan.as_text() + "\n\n" + misfit_message(cfg, plan)


def misfit_message(cfg, plan: M.MemoryPlan) -> str:
    msg = (f"does not fit: needs {plan.total / M.GB:.1f} GB per GPU, "
           f"the {plan.gpu_name} has {plan.capacity / M.GB:.1f} GB.")
    near = nearest_fit(cfg)
    if near is None:
        return msg + " No layout up to 4096 GPUs fits."
    return (msg + f"\nnearest layout that fits ({near.total / M.GB:.1f} GB per GPU): {near.layout.describe()}"
            + "\n  overrides: " + layout_overrides(near.layout))


def layout_overrides(layout: M.Layout) -> str:
    """The Hydra overrides that select `layout`."""
    parts = [f"model.tensor_model_parallel_size={layout.tp}", f"model.pipeline_model_parallel_size={layout.pp}",
             f"model.sequence_parallel={str(layout.sequence_parallel and layout.tp > 1).lower()}",
             f"model.micro_batch_size={layout.micro_batch_size}",
             f"model.activations_checkpoint_granularity={'null' if layout.recompute == 'none' else layout.recompute}",
             f"num_gpus={layout.num_gpus}"]
    if layout.recompute == "full":
        parts += [f"model.activations_checkpoint_method={layout.recompute_method}",
                  f"model.activations_checkpoint_num_layers={layout.recompute_num_layers}"]
    return " ".join(parts)
