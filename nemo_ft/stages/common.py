"""What the NeMo stages share: config errors out, NeMo's trainer + exp_manager in, metrics recorded.

Imported only by stages that run NeMo; the heavy imports stay inside the functions so that
`--help`/`--cfg job` and config errors come back fast.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_ft.config import ConfigError
from nemo_ft.config.validate import ARCH_KEYS, PROFILE_ONLY_KEYS, format_errors
from nemo_ft.data.manifest import atomic_write


def fail(stage: str, errors: list[ConfigError]) -> None:
    print(format_errors(stage, errors), file=sys.stderr)
    sys.exit(2)


def is_rank_zero() -> bool:
    # Before nemo_ft.runtime starts torch.distributed, srun tasks only have SLURM_PROCID.
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def trim_metrics_to_checkpoint(metrics: Path, checkpoints: Path) -> None:
    """On a resume, drop the rows logged after the checkpoint being resumed (exp_manager takes the
    newest *-last.ckpt): a requeued job repeats those steps, and the curve should not jump back."""
    import re

    lasts = list(checkpoints.glob("*-last.ckpt")) if checkpoints.is_dir() else []
    found = re.search(r"-step=(\d+)", max(lasts, key=os.path.getmtime).name) if lasts else None
    if not found or not metrics.exists():
        return
    step = int(found.group(1))
    rows = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_write(str(metrics)) as f:
        f.write("".join(line + "\n" for line in rows))


def nemo_model_cfg(cfg: DictConfig, keep_arch: bool = False) -> DictConfig:
    """cfg as NeMo should see it: without our profile-only keys and, unless building a model from
    scratch (keep_arch), without the profile's architecture keys. A restored checkpoint's own config
    is the truth for its shapes; the profile's copy is only checked against it (run.check_arch) and
    sized by the planner, never merged over it."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in PROFILE_ONLY_KEYS:
            cfg.model.pop(key, None)
        for key in ARCH_KEYS + ("make_vocab_size_divisible_by",):
            if not keep_arch or cfg.model.get(key) is None:
                cfg.model.pop(key, None)
    return cfg


def metrics_callback(path: Path):
    """A Lightning callback appending one JSON line per train step and per validation to `path`."""
    from lightning.pytorch.callbacks import Callback

    def scalar(v):
        return float(v.detach().cpu()) if hasattr(v, "detach") else float(v)

    class MetricsRecorder(Callback):
        def __init__(self):
            self.path = Path(path)
            self.t0 = None

        def _write(self, row):
            if is_rank_zero():
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")

        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            row = {"kind": "train", "step": int(trainer.global_step), "time_s": time.perf_counter() - self.t0}
            for key in ("reduced_train_loss", "lr", "grad_norm", "consumed_samples"):
                if key in m:
                    row[key] = scalar(m[key])
            self._write(row)

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            for key in ("val_loss", "validation_loss"):
                if key in m:
                    self._write({"kind": "validation", "step": int(trainer.global_step), "val_loss": scalar(m[key])})
                    break

    return MetricsRecorder()


def stop_after_callback(steps: int):
    """Stop cleanly after `steps` optimizer steps, as a preempted job would (checkpoint first)."""
    from lightning.pytorch.callbacks import Callback

    class StopAfter(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= steps:
                trainer.should_stop = True

    return StopAfter()


def memory_probe_callback():
    """Measures the bytes the planner predicts: trainable params, their gradients, optimizer state."""
    from lightning.pytorch.callbacks import Callback

    class MemoryProbe(Callback):
        def __init__(self):
            self.measured = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "grad_bytes" not in self.measured:
                grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
                self.measured["grad_bytes"] = sum(g.numel() * g.element_size() for g in grads)
                self.measured["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

        def on_train_end(self, trainer, pl_module):
            # Adam's m and v; the scalar step counters are bookkeeping, not per-parameter state.
            states = [t for opt in trainer.optimizers for st in opt.state.values() for t in st.values()
                      if hasattr(t, "numel") and t.dim() > 0]
            self.measured["optimizer_bytes"] = sum(t.numel() * t.element_size() for t in states)

    return MemoryProbe()


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "validation"]


def plot_losses(metrics: Path, out: Path, title: str) -> Path:
    """Train (per step) and validation loss curves, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r.get("reduced_train_loss") for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_write(str(out), "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    """NeMo's own Megatron trainer (strategy, precision plugins) and exp_manager (TensorBoard, checkpoints)."""
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder
    from nemo.utils.exp_manager import exp_manager

    callbacks = [metrics_callback(run_dir / cfg.run.metrics_file), *extra_callbacks]
    if cfg.run.get("stop_after_steps"):
        callbacks.append(stop_after_callback(int(cfg.run.stop_after_steps)))
    trainer = MegatronLMPPTrainerBuilder(cfg).create_trainer(callbacks=callbacks)
    exp_manager(trainer, cfg.exp_manager)
    return trainer


def quiet_nemo() -> None:
    """NeMo logs every config and warning at INFO; keep our own summary readable."""
    import logging as pylogging
    import warnings

    from nemo.utils import logging

    logging.setLevel(pylogging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

