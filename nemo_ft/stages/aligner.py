"""What the NeMo-Aligner stages (dpo, rm, reinforce, ppo) share on top of the lifecycle: their data checks,
and the setup Aligner's scripts do before its own training loop takes over from Lightning.

Aligner's loops (DPOTrainer, SupervisedTrainer, ...) do not run trainer.fit: the script attaches the
model to NeMo's Lightning trainer by hand (init_distributed, init_using_ptl), builds Megatron samplers
and logs through trainer.loggers. `setup_loop` does exactly that, with our metrics.jsonl logger added.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf, open_dict

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


def base_tokenizer_sha(base) -> Optional[str]:
    with NemoArchive(base) as a:
        return a.tokenizer_sha256()


def check_splits(cfg, *, task: str, units: Callable[[list], int], unit: str, row_keys: tuple, append_eod: bool,
                 append_eod_key: str, prep_eod_key: str, base_tok: Optional[str]) -> list:
    """The train and validation files of model.data.data_prefix: one file each, written by `prep
    task=<task>` for this base's tokenizer and EOS setting, unchanged since, and at least one global
    batch of `unit`s each (Aligner runs zero steps, or fails on an empty validation mean, otherwise)."""
    if cfg.model.data.data_prefix is None:
        return [ConfigError("model.data.data_prefix", f"is required: {{train: [f], validation: [f], test: [f]}} of "
                                                      f"`nemo-ft prep task={task}` output (or data_dir=<that out_dir>)")]
    errors, gbs = [], int(cfg.model.global_batch_size)
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
        n = units(data)
        if n < gbs:
            errors.append(InputError(f"holds {n} {unit}(s), fewer than one global batch (model.global_batch_size="
                                     f"{gbs}): Aligner would run zero steps; add data or lower the batch",
                                     path=path, key=key))
        try:
            m = artifacts.manifest_next_to(path)
            if m is None or m.stage != "prep":
                continue
            m.verify(m.record_for(path))
            if m.summary.get("task") != task:
                errors.append(InputError(f"was prepared with task={m.summary.get('task')}; this stage needs "
                                         f"task={task}", path=path, key=key))
            prepared = bool(OmegaConf.select(OmegaConf.create(m.config or {}), prep_eod_key, default=False))
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


def setup_loop(run, model, build_datasets, train_random: bool = True, val_random: bool = False,
               collate_fn=None) -> Loop:
    """init_distributed, datasets, Megatron samplers, init_using_ptl, optimizer/scheduler, loggers,
    the checkpoint callback and the resume state, in Aligner's order."""
    from nemo_aligner.data.nlp.builders import build_dataloader
    from nemo_aligner.utils.distributed import Timer
    from nemo_aligner.utils.train_script_utils import (CustomLoggerWrapper, add_custom_checkpoint_callback,
                                                       extract_optimizer_scheduler_from_ptl_model, init_distributed,
                                                       init_using_ptl, retrieve_custom_trainer_state_dict)

    from nemo_ft.stages.callbacks import jsonl_logger

    cfg = run.cfg
    init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))
    gbs, mbs = int(cfg.model.global_batch_size), int(cfg.model.micro_batch_size)
    data_cfg = model.cfg.copy()
    with open_dict(data_cfg):
        data_cfg.data.data_prefix = OmegaConf.to_container(cfg.model.data.data_prefix)
        data_cfg.data.index_mapping_dir = str(run.dir / "data_index")
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
                run_timer=Timer(cfg.exp_manager.get("max_time_per_run")), state=state)


def plot_panels(metrics: Path, out: Path, title: str, panels: list) -> Path:
    """A grid of train (per step) and validation curves: panels = [(title, [(metric key or fn, label)], hline)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nemo_ft.stages.metrics import read_metrics

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
