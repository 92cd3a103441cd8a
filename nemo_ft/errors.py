"""The errors every layer of nemo-ft may raise, and the exit codes the stages turn them into.

Plain Python (no omegaconf, no torch), so the pure core (data, plan, export, eval) can raise them.
- ConfigError: a bad config value; names the key. Exit 2.
- InputError: an input file that cannot be used (bad row format, wrong tokenizer, unsafe .nemo,
  tampered manifest); names the file, and the line and key where there is one. Exit 2.
- GateFailure: eval's gates failed; the adapter must not ship. Exit 3.
- Preempted: SIGUSR1/SIGTERM reached a training stage, which checkpointed at the step boundary and
  stopped; rerun the same command (slurm/_launch.sh requeues the job) to resume. Exit 75 (EX_TEMPFAIL).
A stage prints every such error at once, one line each, and no traceback.
"""
from __future__ import annotations

from typing import Optional

EXIT_CONFIG = 2  # config and input errors: nothing was started
EXIT_GATES = 3   # eval: one or more gates failed
EXIT_PREEMPTED = 75  # checkpointed on a signal, resume by rerunning (slurm/_launch.sh: NEMO_FT_REQUEUE_EXIT)


class NemoFtError(Exception):
    """What a stage reports as a one-line error instead of a traceback."""

    exit_code = EXIT_CONFIG


class ConfigError(NemoFtError, ValueError):
    """A bad config value: `key` names it, the message says what was expected and how to fix it."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


class InputError(NemoFtError):
    """An input file nemo-ft cannot continue with: names the file, the line and the key."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None):
        self.path, self.line, self.key, self.message = path, line, key, message
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")


class GateFailure(NemoFtError):
    """Eval's verdict: the named gates failed (exit 3, distinct from config errors)."""

    exit_code = EXIT_GATES

    def __init__(self, failed: list[str]):
        self.failed = list(failed)
        super().__init__(f"{len(self.failed)} gate(s) failed: " + "; ".join(self.failed))


class Preempted(NemoFtError):
    """A signal stopped training at a step boundary after a checkpoint (exit 75: requeue and rerun)."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signal_name: str, step: int, checkpoints: str):
        self.signal_name, self.step = signal_name, step
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint in {checkpoints}: rerun the same "
                         f"command to resume (exit {EXIT_PREEMPTED}: slurm/_launch.sh requeues the job)")
