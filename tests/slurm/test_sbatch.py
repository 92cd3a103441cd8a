"""`sbatch slurm/sft_lora.sh` on a real one-node SLURM (.ci/slurm_up.sh starts one; CI requires it)."""
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, read_metrics, tiny_lora_params

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
    assert f"{tiny_lora_params(['attention_qkv'], 32)} params in 2 file(s)" in log


def test_sbatch_task_count_mismatch_fails_before_anything_starts(tmp_path):
    rc, log = sbatch(tmp_path, "--ntasks=1", "slurm/sft_lora.sh", "parallel=cpu_tp2", f"run.dir={tmp_path / 'run'}")
    assert rc == 2, log[-3000:]
    assert "trainer.devices: the launcher started 1 process(es)" in log and "Traceback" not in log
    assert not (tmp_path / "run" / "nemo").exists()


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _train_steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir)[0]]
    except (FileNotFoundError, ValueError):  # not written yet, or a line caught half-written
        return []


def _wait_done(job_id: str, deadline: float, *, restart_now: bool = False) -> dict:
    """Poll until the job ends; a requeued job's BeginTime hold (~2 min) is lifted with StartTime=now."""
    job = {}
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        if restart_now and job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.get('JobState')} ({job.get('Reason')}) at the deadline")


def _requeue_mid_run_and_wait(job_id: str, run_dir, ref_id: str, tmp_path):
    """Requeue the job once it trained past its first checkpoint, let it rerun at once, wait for both jobs."""
    deadline = time.monotonic() + 240
    while True:
        steps = _train_steps(run_dir)
        ckpts = list((run_dir / "nemo" / "checkpoints").glob("*-last.ckpt"))
        if _job(job_id)["JobState"] == "RUNNING" and ckpts and len(steps) >= 60:
            break
        assert time.monotonic() < deadline and len(steps) < 400, f"no mid-run checkpoint to requeue at: {steps[-1:]}"
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    job = _wait_done(job_id, deadline, restart_now=True)
    return job, _wait_done(ref_id, deadline), (tmp_path / "requeued.out").read_text()


def test_requeued_job_resumes_from_its_checkpoint(tmp_path):
    """Preempt a running job for real (scontrol requeue): the rerun resumes from the last checkpoint.

    400 steps with a checkpoint every 50 keep the tiny model training long enough (~12 s on CPU) to be
    requeued mid-run. The requeue's SIGTERM makes the first attempt checkpoint the step it is on; every
    row of the resumed run must equal an uninterrupted reference run's row.
    """
    args = ("slurm/sft_lora.sh", "parallel=cpu", "trainer.max_steps=400", "trainer.val_check_interval=50",
            "trainer.enable_progress_bar=false")
    runs = {name: tmp_path / name for name in ("requeued", "reference")}
    jobs = {}
    for name, run_dir in runs.items():  # both at once: one CPU each
        proc = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append",
                               f"--output={tmp_path / name}.out", *args, f"run.dir={run_dir}"],
                              cwd=REPO, capture_output=True, text=True, check=True)
        jobs[name] = proc.stdout.strip().split(";")[0]
    try:
        job, ref_job, log = _requeue_mid_run_and_wait(jobs["requeued"], runs["requeued"], jobs["reference"], tmp_path)
    finally:  # nothing left running after a failure
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    job_id, run_dir = jobs["requeued"], runs["requeued"]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert (ref_job["JobState"], ref_job["ExitCode"]) == ("COMPLETED", "0:0")
    assert f"job {job_id} restart 0" in log and f"job {job_id} restart 1" in log
    assert (run_dir / "adapter.nemo").exists()

    # The rerun restored the checkpoint of the step c the first attempt was on when the requeue's SIGTERM
    # arrived: it finished that step, wrote its checkpoint and exited 75 (callbacks.Preemption).
    first, rerun = log.split(f"job {job_id} restart 1", 1)
    pattern = r"Restoring states from the checkpoint path at \S+-step=(\d+)-\S+-last\.ckpt"
    restored = set(re.findall(pattern, rerun))  # a set: Lightning's and hydra's loggers both print it
    assert len(restored) == 1 and "Restoring states" not in first, rerun[-3000:]
    c = int(restored.pop())
    assert re.findall(r"stopped by SIGTERM after step (\d+)", first) == [str(c)] and 60 <= c < 400, first[-3000:]

    # metrics.jsonl: the rows the first attempt logged after checkpoint c were dropped on resume
    # (the rerun repeats those steps), so the steps run straight 1..400 and every row equals the
    # reference run's row for that step: the file is the uninterrupted curve.
    train, val = read_metrics(run_dir)
    ref_train, ref_val = read_metrics(runs["reference"])
    assert [r["step"] for r in ref_train] == list(range(1, 401))
    steps = [r["step"] for r in train]
    assert steps == list(range(1, 401)), steps
    for row in train:
        ref = ref_train[row["step"] - 1]
        for key in ("reduced_train_loss", "grad_norm", "lr", "consumed_samples"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-6), (row["step"], key)
    last_val = {r["step"]: r["val_loss"] for r in val}
    ref = {r["step"]: r["val_loss"] for r in ref_val}
    assert sorted(ref) == list(range(50, 401, 50))
    assert {k: last_val[k] for k in ref} == pytest.approx(ref, abs=1e-6)
    assert set(last_val) - set(ref) <= {c}  # Lightning also validates the step the stop landed on
