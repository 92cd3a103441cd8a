"""Shared fixtures: run stages the way users do (a subprocess, torchrun for several ranks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def stage_env() -> dict:
    env = dict(os.environ)
    # NeMo compiles a helper with `python3 -m pybind11`: the venv must be first on PATH.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_stage(stage: str, *overrides: str, nproc: int = 1, timeout: int = 600, check: bool = True):
    if nproc > 1:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
               "-m", f"nemo_ft.stages.{stage}", *overrides]
    else:
        cmd = [sys.executable, "-m", f"nemo_ft.stages.{stage}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "validation"]


# Small, fast settings shared by the e2e SFT runs: 60 steps, validation every 20.
SFT_FAST = ("trainer.enable_progress_bar=false", "trainer.max_steps=60", "trainer.val_check_interval=20")


@pytest.fixture(scope="session")
def sft_tp1(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft_tp1")
    run_stage("sft", f"run.dir={run_dir}", *SFT_FAST)
    return run_dir


@pytest.fixture(scope="session")
def sft_tp2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft_tp2")
    run_stage("sft", f"run.dir={run_dir}", "parallel=cpu_tp2", *SFT_FAST, nproc=2)
    return run_dir
