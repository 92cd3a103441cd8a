"""Lightning callbacks the NeMo stages add to NeMo's trainer: metrics.jsonl, a clean stop, a memory probe."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback


def _scalar(v) -> float:
    return float(v.detach().cpu()) if hasattr(v, "detach") else float(v)


class MetricsRecorder(Callback):
    """Appends one JSON line per train step and per validation to `path` (on rank 0)."""

    TRAIN_KEYS = ("reduced_train_loss", "lr", "grad_norm", "consumed_samples")

    def __init__(self, path: Path, write: bool):
        self.path, self.write, self.t0 = Path(path), write, None

    def _write(self, row: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        row = {"kind": "train", "step": int(trainer.global_step), "time_s": time.perf_counter() - self.t0}
        row.update({k: _scalar(m[k]) for k in self.TRAIN_KEYS if k in m})
        self._write(row)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        for key in ("val_loss", "validation_loss"):
            if key in m:
                self._write({"kind": "validation", "step": int(trainer.global_step), "val_loss": _scalar(m[key])})
                break


class StopAfter(Callback):
    """Stop cleanly after `steps` optimizer steps, as a preempted job would (checkpoint first)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class Preemption(Callback):
    """SIGUSR1 (SLURM's `--signal=B:USR1@T`, passed on by slurm/_launch.sh) or SIGTERM (scancel,
    preemption) during training: finish the current step, stop, and let NeMo's checkpoint callback write
    its -last checkpoint at train end (it does when the step is not a validation step; a validation
    step has just saved one). The stage then raises Preempted (exit 75) instead of saving a result.

    The handlers only set a flag. Every rank must stop at the same step or the others would hang in the
    next collective: the flag is all-reduced (max) once per step, so a signal to one rank stops all.
    Installed at train start, after Lightning's own SIGTERM handler (which would exit at the next step
    without a checkpoint; Lightning's SLURM auto-requeue is off, see lifecycle.build_trainer)."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.received: Optional[str] = None  # set by the handler (this rank)
        self.stopped_by: Optional[str] = None  # agreed by all ranks, set when training was stopped
        self.step: Optional[int] = None
        self._old = {}

    def _handler(self, signum, frame):
        import signal
        self.received = self.received or signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module):
        import signal
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handler)

    def _agreed(self) -> Optional[str]:
        import torch
        import torch.distributed as dist

        code = self.SIGNALS.index(self.received) + 1 if self.received else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return self.SIGNALS[code - 1] if code else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        agreed = self._agreed()
        if agreed and not self.stopped_by:
            self.stopped_by, self.step = agreed, int(trainer.global_step)
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage):
        import signal
        for sig, old in self._old.items():  # after NeMo's -last checkpoint (on_train_end) was written
            signal.signal(sig, old)
        self._old = {}


class MemoryProbe(Callback):
    """Measures the bytes the planner predicts: trainable params, their gradients, optimizer state."""

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


TRAIN_VAL = {"train": "train", "val": "validation"}


def jsonl_logger(path: Path, write: bool, kinds: dict = TRAIN_VAL, tables: Optional[Path] = None):
    """A Lightning logger for NeMo-Aligner's loops (they log through trainer.loggers, not callbacks):
    metrics.jsonl rows {"kind", "step", ...} from the metric keys whose prefix `kinds` maps to a kind
    ("train/" -> train, "val/" -> validation for DPO/RM; REINFORCE logs "train_rollouts/", ...). With
    `tables`, the newest row of each table Aligner logs (a sample prompt, response and reward per step)
    is appended there as one JSON line."""
    from lightning.pytorch.loggers.logger import Logger

    class JsonlLogger(Logger):
        name, version = "nemo_ft_metrics", 0

        def log_metrics(self, metrics, step=None):
            rows = {}
            for key, value in metrics.items():
                prefix, _, name = key.partition("/")
                kind = kinds.get(prefix)
                if kind and name:
                    rows.setdefault(kind, {})[name] = _scalar(value)
            if write:
                with open(path, "a") as f:
                    for kind, row in rows.items():
                        f.write(json.dumps({"kind": kind, "step": int(step or 0), **row}) + "\n")

        def log_table(self, key, dataframe=None, step=None, **kwargs):
            if write and tables is not None and dataframe is not None and len(dataframe):
                row = {k: _scalar(v) if not isinstance(v, str) else v for k, v in dataframe.iloc[-1].items()}
                with open(tables, "a") as f:
                    f.write(json.dumps({"table": key, **row}, default=str) + "\n")

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return JsonlLogger()
