"""Submit and watch real SLURM jobs on either CI cluster: the one-node one of .ci/slurm_up.sh (the
default slurm.conf) or the two-node one of .ci/slurm2_up.sh (SLURM_CONF=TWO_NODE_CONF).

Without slurmdbd there is no sacct: a job's end state is read from `scontrol show job`, which keeps it
for MinJobAge (an hour) on both clusters.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO

TWO_NODE_CONF = "/tmp/nemo-ft-slurm2/slurm.conf"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def env(conf: str | None = None, **extra) -> dict:
    e = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    if conf:
        e["SLURM_CONF"] = conf
    e.update(extra)
    return e


UP = ("idle", "planned", "mixed", "allocated", "completing")  # the node answers (free, or busy with a job)


def up_nodes(conf: str | None = None) -> int:
    if not shutil.which("sinfo"):
        return 0
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env(conf))
    return sum(s in UP for s in out.stdout.split()) if out.returncode == 0 else 0


def submit(*args, conf: str | None = None, cwd: Path = REPO, **extra_env) -> str:
    """sbatch --parsable from the checkout (so the jobs run this checkout's code); the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env(conf, **extra_env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str, conf: str | None = None) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True,
                         env=env(conf))
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def lift_requeue_hold(job_id: str, conf: str | None = None) -> None:
    """A requeued job waits ~2 min (BeginTime). Start it 3 s from now instead: a start in the same
    second as the requeue finds the job's credential still revoked on the node and fails."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], capture_output=True, env=env(conf))


def wait_all(job_ids, timeout: float, conf: str | None = None, *, rerun_now: bool = False) -> dict:
    """Poll until every job has ended; {job id: its record}. With rerun_now, lift each requeue's hold."""
    deadline = time.monotonic() + timeout
    done, lifted, state = {}, set(), {}
    while time.monotonic() < deadline:
        for job_id in [j for j in job_ids if j not in done]:
            state = job(job_id, conf)
            if state["JobState"] in ENDED:
                done[job_id] = state
            elif state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime" and rerun_now \
                    and job_id not in lifted:
                lift_requeue_hold(job_id, conf)
                lifted.add(job_id)
            elif state["JobState"] == "RUNNING":
                lifted.discard(job_id)
        if len(done) == len(job_ids):
            return done
        time.sleep(0.3)
    raise AssertionError(f"jobs {sorted(set(job_ids) - set(done))} not ended after {timeout} s: last seen "
                         f"{state.get('JobState')} ({state.get('Reason')})")


def wait_done(job_id: str, timeout: float, conf: str | None = None, *, rerun_now: bool = False) -> dict:
    """Poll until the job has ended and return its record; with rerun_now, lift a requeue's hold."""
    return wait_all([job_id], timeout, conf, rerun_now=rerun_now)[job_id]


def cancel(*job_ids: str, conf: str | None = None) -> None:
    subprocess.run(["scancel", *job_ids], capture_output=True, env=env(conf))
