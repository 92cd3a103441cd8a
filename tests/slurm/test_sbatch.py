"""`sbatch slurm/sft_lora.sh` on a real one-node SLURM (.ci/slurm_up.sh starts one; CI requires it)."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO, read_metrics

def _slurm_ready() -> bool:
    if not shutil.which("sbatch"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout


SLURM_READY = _slurm_ready()
if not SLURM_READY and os.environ.get("NEMO_FT_REQUIRE_SLURM"):
    raise RuntimeError("NEMO_FT_REQUIRE_SLURM is set (CI) but no idle SLURM node: run .ci/slurm_up.sh")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SLURM_READY, reason="no SLURM here (bash .ci/slurm_up.sh starts one)")]


def sbatch(tmp_path, *args):
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--wait", f"--output={out}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, out.read_text() if out.exists() else ""


def test_sbatch_tp2_with_two_srun_tasks(tmp_path):
    rc, log = sbatch(tmp_path, "--ntasks=2", "--ntasks-per-node=2", "slurm/sft_lora.sh", "parallel=cpu_tp2",
                     f"run.dir={tmp_path / 'run'}", "trainer.max_steps=10", "trainer.enable_progress_bar=false")
    assert rc == 0, log[-3000:]
    assert "2 task(s)" in log
    train, _ = read_metrics(tmp_path / "run")
    assert len(train) == 10 and train[-1]["reduced_train_loss"] < train[0]["reduced_train_loss"]
    assert "12288 params in 2 file(s)" in log


def test_sbatch_task_count_mismatch_fails_before_anything_starts(tmp_path):
    rc, log = sbatch(tmp_path, "--ntasks=1", "slurm/sft_lora.sh", "parallel=cpu_tp2", f"run.dir={tmp_path / 'run'}")
    assert rc == 2, log[-3000:]
    assert "trainer.devices: the launcher started 1 process(es)" in log and "Traceback" not in log
    assert not (tmp_path / "run" / "nemo").exists()
