"""What the NeMo-Aligner stages (dpo, rm, reinforce, ppo) share on top of the lifecycle: their data checks,
and the setup Aligner's scripts do before its own training loop takes over from Lightning.

Aligner's loops (DPOTrainer, SupervisedTrainer, ...) do not run trainer.fit: the script attaches the
model to NeMo's Lightning trainer by hand (init_distributed, init_using_ptl), builds Megatron samplers
and logs through trainer.loggers. `setup_loop` does exactly that, with our metrics.jsonl logger added.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_ft import artifacts
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.nemo_archive import NemoArchive

SPLIT_ROLES = ("train", "validation", "test")


def rows(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def split_file(cfg, role: str) -> Optional[str]:
    files = list(OmegaConf.select(cfg, f"model.data.data_prefix.{role}") or [])
    return files[0] if len(files) == 1 else None


def data_prefix_from(prep_dir, key: str = "data_dir") -> dict:
    """Aligner's data_prefix {train: [f], validation: [f], test: [f]} from a prep run's manifest."""
    prep = artifacts.read_manifest(prep_dir, stage="prep", key=key)
    return {role: [str(prep.output(role))] for role in SPLIT_ROLES}


@contextlib.contextmanager
def nemo_tokenizer(path, key: str):
    """Our Tokenizer over the SentencePiece model packed in a .nemo (None if it packs none): counts
    tokens exactly as the model will, without NeMo."""
    from nemo_ft.data.tokenize import Tokenizer

    with NemoArchive(path, key=key) as a:
        name = a.tokenizer_file()
        found = [n for n in a.files() if Path(n).name == name] if name else []
        data = a.read(found[0]) if found and name.endswith(".model") else None
    if data is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(data)
        yield Tokenizer("sentencepiece", str(Path(d) / name))


def base_tokenizer_sha(base) -> Optional[str]:
    with NemoArchive(base) as a:
        return a.tokenizer_sha256()


def check_splits(cfg, *, task: str, units: Callable[[list], int], unit: str, row_keys: tuple,
                 base_tok: Optional[str], append_eod: Optional[bool] = None, append_eod_key: str = "",
                 prep_eod_key: str = "", minimum: Optional[dict] = None) -> list:
    """The train and validation files of model.data.data_prefix: one file each, written by `prep
    task=<task>` for this base's tokenizer and EOS setting (when the task has one), unchanged since, and
    at least one batch of `unit`s each (Aligner runs zero steps, or fails on an empty validation mean,
    otherwise): `minimum` {role: (count, "the key that asks for it")}, by default one global batch."""
    if cfg.model.data.data_prefix is None:
        return [ConfigError("model.data.data_prefix", f"is required: {{train: [f], validation: [f], test: [f]}} of "
                                                      f"`nemo-ft prep task={task}` output (or data_dir=<that out_dir>)")]
    gbs = int(cfg.model.global_batch_size)
    errors, minimum = [], minimum or {r: (gbs, "model.global_batch_size") for r in ("train", "validation")}
    for role in ("train", "validation"):
        key = f"model.data.data_prefix.{role}"
        path = split_file(cfg, role)
        if path is None:
            errors.append(ConfigError(key, "one JSONL file per split (Aligner reads a one-element list)"))
            continue
        if not Path(path).exists():
            errors.append(ConfigError(key, f"file not found: {path}"))
            continue
        data = rows(path)
        if data and not set(row_keys) <= set(data[0]):
            errors.append(InputError(f"rows lack {list(row_keys)}: not `nemo-ft prep task={task}` output",
                                     path=path, key=key))
            continue
        n, (need, need_key) = units(data), minimum[role]
        if n < need:
            errors.append(InputError(f"holds {n} {unit}(s), fewer than one batch ({need_key}={need}): Aligner "
                                     "would run zero steps; add data or lower the batch", path=path, key=key))
        try:
            m = artifacts.manifest_next_to(path)
            if m is None or m.stage != "prep":
                continue
            m.verify(m.record_for(path))
            if m.summary.get("task") != task:
                errors.append(InputError(f"was prepared with task={m.summary.get('task')}; this stage needs "
                                         f"task={task}", path=path, key=key))
            prepared = bool(OmegaConf.select(OmegaConf.create(m.config or {}), prep_eod_key, default=False)) \
                if prep_eod_key else append_eod
            if prepared != append_eod:
                errors.append(ConfigError(append_eod_key, f"{path} was prepared with {prep_eod_key}={prepared} (its "
                                          f"length checks assume it); set {append_eod_key}={str(prepared).lower()}"))
            prep_tok = (m.summary.get("tokenizer") or {}).get("sha256")
            if prep_tok and base_tok and prep_tok != base_tok:
                errors.append(InputError("was tokenized by prep with another tokenizer than the base's; re-run prep "
                                         "with the base's tokenizer", path=path, key=key))
        except InputError as err:
            errors.append(err)
    return errors


def from_sft_run(cfg, algorithm: str) -> list[str]:
    """derive: from_run=<sft run dir> names the SFT adapter (merged into the base before training) and
    the base it was trained on."""
    if not cfg.from_run:
        return []
    m = artifacts.read_manifest(cfg.from_run, stage="sft", key="from_run")
    cfg.sft_adapter = cfg.sft_adapter or str(m.output("adapter"))
    base = (m.input("base") or {}).get("path")
    if base:
        cfg.pretrained_checkpoint.restore_from_path = base
    return [f"from {m.path}: SFT adapter {cfg.sft_adapter} merged into {base} before {algorithm}"]


def check_sft_adapter(cfg, base_ok: bool, skip) -> list:
    """sft_adapter: a LoRA adapter of this base, and not also given as the adapter to train on."""
    errors = []
    if cfg.sft_adapter and cfg.model.peft.get("restore_from_path"):
        errors.append(ConfigError("sft_adapter", "give sft_adapter (merged into the base: the reference is the SFT "
                                                 "model) or model.peft.restore_from_path (trained on; NOT in the "
                                                 "reference), not both"))
    if not (base_ok and cfg.sft_adapter and Path(str(cfg.sft_adapter)).exists() and "sft_adapter" not in skip):
        return errors
    with NemoArchive(OmegaConf.select(cfg, "pretrained_checkpoint.restore_from_path"), key="pretrained_checkpoint."
                     "restore_from_path") as a:
        base_conf = a.config()
    with NemoArchive(cfg.sft_adapter, key="sft_adapter") as a:
        conf = a.config()
    if (conf.get("peft") or {}).get("peft_scheme") != "lora":
        errors.append(InputError("only a LoRA adapter merges into the base", path=cfg.sft_adapter, key="sft_adapter"))
    for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if conf.get(k) != base_conf.get(k):
            errors.append(InputError(f"was trained on another base: {k} is {conf.get(k)!r}, the base's "
                                     f"{base_conf.get(k)!r}", path=cfg.sft_adapter, key="sft_adapter"))
            break
    return errors


def merge_sft(run, cfg) -> Path:
    """The base with the SFT adapter folded in (W + (alpha/r) B A, fp32), saved as a base .nemo: Aligner's
    reference (DPO) or initial (RLHF) policy is the policy with adapters off, which is then the SFT model."""
    import torch

    from nemo_ft import reshard
    from nemo_ft.export import merge_lora

    model = run.restore(cfg.pretrained_checkpoint.restore_from_path)
    adapter = reshard.read_adapter(cfg.sft_adapter, key="sft_adapter")
    params = dict(model.model.named_parameters())
    base_np = {k: p.detach().float().numpy() for k, p in params.items()}
    merged = merge_lora(base_np, adapter.canonical, adapter.spec)
    with torch.no_grad():
        for k, v in merged.items():
            if v is not base_np[k]:
                params[k].copy_(torch.from_numpy(v).to(params[k].dtype))
    out, _ = run.save_nemo(model, run.dir / "sft_merged_base.nemo")
    del model
    run.log(f"merged {cfg.sft_adapter} into the base -> {out.name} (the adapters-off policy)")
    return out


@dataclass
class Loop:
    """What an Aligner trainer class takes, set up the way Aligner's scripts set it up."""
    train_ds: object
    train_dl: object
    val_dl: object
    optimizer: object
    scheduler: object
    logger: object
    ckpt_callback: object
    run_timer: object
    state: Optional[dict]  # the trainer state of a resumed run


def preemptible_timer(cfg: DictConfig, signals=("SIGUSR1",)):
    """Aligner's run Timer (exp_manager.max_time_per_run), which also runs out when one of `signals`
    arrives (SIGUSR1: what slurm/_launch.sh passes on from `#SBATCH --signal=B:USR1@T`; SIGTERM: scancel,
    a preemption, Kubernetes): Aligner's loops then do what they do at their time limit, save a checkpoint
    at the step boundary and stop; the stage raises Preempted (exit 75) and slurm/_launch.sh requeues the
    job. Only rank 0's timer counts (Aligner broadcasts it), so every rank stops at the same step. The
    handler only sets a flag. DPO and RM take both signals; the RLHF actors keep SIGTERM for "stop now"
    (their reward/critic server is stopped with them)."""
    import signal

    from nemo_aligner.utils.distributed import Timer

    class PreemptibleTimer(Timer):
        received: Optional[str] = None

        def start_time(self):
            def on_signal(signum, frame):
                self.received = signal.Signals(signum).name
            for name in signals:
                signal.signal(getattr(signal, name), on_signal)
            super().start_time()

        def get_time_remaining(self):
            return -1.0 if self.received else super().get_time_remaining()

    return PreemptibleTimer(cfg.exp_manager.get("max_time_per_run"))


def check_preempted(run, timer, step: int) -> None:
    """After an Aligner loop returned: stopped by a signal (preemptible_timer)? Then Preempted, exit 75."""
    if getattr(timer, "received", None):
        import torch.distributed as dist

        from nemo_ft.errors import Preempted
        if dist.is_initialized():
            dist.barrier()  # every rank's part of the checkpoint is written
        raise Preempted(timer.received, int(step), str(run.dir / "nemo" / "checkpoints"))


def dataset_cfg(model, cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The restored model's config with this run's data files, and Aligner's index files in run.dir."""
    data_cfg = model.cfg.copy()
    with open_dict(data_cfg):
        data_cfg.data.data_prefix = OmegaConf.to_container(cfg.model.data.data_prefix)
        data_cfg.data.index_mapping_dir = str(run_dir / "data_index")
    return data_cfg


def setup_loop(run, model, build_datasets, train_random: bool = True, val_random: bool = False,
               collate_fn=None) -> Loop:
    """init_distributed, datasets, Megatron samplers, init_using_ptl, optimizer/scheduler, loggers,
    the checkpoint callback and the resume state, in Aligner's order."""
    from nemo_aligner.data.nlp.builders import build_dataloader
    from nemo_aligner.utils.train_script_utils import (CustomLoggerWrapper, add_custom_checkpoint_callback,
                                                       extract_optimizer_scheduler_from_ptl_model, init_distributed,
                                                       init_using_ptl, retrieve_custom_trainer_state_dict)

    from nemo_ft.stages.callbacks import jsonl_logger

    cfg = run.cfg
    init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))
    gbs, mbs = int(cfg.model.global_batch_size), int(cfg.model.micro_batch_size)
    data_cfg = dataset_cfg(model, cfg, run.dir)
    train_ds, val_ds, _ = build_datasets(
        cfg=data_cfg, data_prefix=data_cfg.data.data_prefix, data_impl="jsonl", splits_string=None,
        train_valid_test_num_samples=[-1 * gbs] * 3, seq_length=int(cfg.model.data.seq_length), seed=cfg.model.seed,
        tokenizer=model.tokenizer)
    state = retrieve_custom_trainer_state_dict(run.trainer) if run.trainer.ckpt_path else None
    loader_cfg = OmegaConf.create({"model": {"seed": cfg.model.seed, "data": {"num_workers": 0}}})
    extra = {"collate_fn": collate_fn} if collate_fn else {}
    train_dl = build_dataloader(cfg=loader_cfg, dataset=train_ds, consumed_samples=state["consumed_samples"] if state
                                else 0, mbs=mbs, gbs=gbs, load_gbs=True, use_random_sampler=train_random, **extra)
    val_dl = build_dataloader(cfg=loader_cfg, dataset=val_ds, consumed_samples=0, mbs=mbs, gbs=gbs, load_gbs=True,
                              use_random_sampler=val_random, **extra)
    init_using_ptl(run.trainer, model, train_dl, train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
    return Loop(train_ds=train_ds, train_dl=train_dl, val_dl=val_dl, optimizer=optimizer, scheduler=scheduler,
                logger=CustomLoggerWrapper(list(run.trainer.loggers) + [jsonl_logger(run.metrics, run.rank0)]),
                ckpt_callback=add_custom_checkpoint_callback(run.trainer, model),
                run_timer=preemptible_timer(cfg, ("SIGUSR1", "SIGTERM")), state=state)


def plot_panels(metrics: Path, out: Path, title: str, panels: list) -> Path:
    """A grid of train (per step) and validation curves: panels = [(title, [(metric key or fn, label)], hline)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nemo_ft.stages._metrics import read_metrics

    train, val = read_metrics(metrics)
    cols = 2
    fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(11, 3.5 * ((len(panels) + 1) // cols)),
                             squeeze=False)
    for ax, (name, series, hline) in zip(axes.flat, panels):
        for get, label in series:
            fn = get if callable(get) else (lambda r, k=get: r.get(k))
            ax.plot([r["step"] for r in train], [fn(r) for r in train], label=f"{label} (train)", lw=1)
            if val:
                ax.plot([r["step"] for r in val], [fn(r) for r in val], "o-", label=f"{label} (validation)")
        if hline is not None:
            ax.axhline(hline, color="grey", ls=":", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with artifacts.atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
