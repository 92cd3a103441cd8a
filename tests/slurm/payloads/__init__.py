"""Tiny stand-ins for stages, run by the real slurm/*.sh scripts (NEMO_FT_STAGE_PKG=tests.slurm.payloads)
to test what the scripts wire: signals into srun tasks, heterogeneous jobs. No NeMo, no torch."""
import os
import socket
import sys


def overrides(argv=None) -> dict:
    """The key=value overrides a stage script passes on (Hydra's syntax, read plainly)."""
    return dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)


def say(*words) -> None:
    rank = os.environ.get("SLURM_PROCID", "0")
    print(f"[payload] rank {rank} on {socket.gethostname()}:", *words, flush=True)
