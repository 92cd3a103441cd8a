"""Shared test helpers: run stages the way users do (a subprocess, torchrun for several ranks), run
prep in-process, read what stages wrote. Test files import these from here, never from each other.

Tests are laid out by what they need, and marked by their folder:
  pure/  seconds, no NeMo (`make test-fast`)    nemo/   imports NeMo or runs a stage's checks, CPU
  e2e/   trains the tiny model through NeMo     slurm/  real sbatch jobs (.ci/slurm_up.sh)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOKENIZER = str(REPO / "data" / "tiny" / "tokenizer.model")
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}
FOLDER_MARKS = ("pure", "nemo", "e2e", "slurm", "serve")


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if folder in FOLDER_MARKS:
            item.add_marker(getattr(pytest.mark, folder))


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


def prep(tmp_path, inputs, **over):
    """nemo-ft prep in-process on the tiny tokenizer: all rows to train, seq_length 64, one worker."""
    from nemo_ft.data.config import PrepConfig
    from nemo_ft.data.pipeline import run_prep

    c = {"inputs": [str(i) if not isinstance(i, dict) else i for i in inputs], "out_dir": str(tmp_path / "out"),
         "tokenizer": {"library": "sentencepiece", "model": TOKENIZER}, "seq_length": 64,
         "split": dict(ALL_TRAIN), "progress": False, "workers": 1}
    c.update(over)
    return run_prep(PrepConfig.from_dict(c), resolved_config=c)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def outputs_by_path(manifest: dict) -> dict:
    """A manifest's output records keyed by their (run-dir relative) path."""
    return {r["path"]: r for r in manifest["outputs"]}
