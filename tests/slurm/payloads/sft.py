"""Stands in for the sft stage to prove a job's --signal reaches the process inside srun: it records
the signal it receives, then exits 75 (checkpointed, run me again) as a stage would, so the job
script requeues the job; the rerun (SLURM_RESTART_COUNT=1) finishes at once."""
import os
import signal
import time

from tests.slurm.payloads import say

received = []


def main() -> int:
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restart:
        say(f"restart {restart}: resumed, done")
        return 0
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum).name))
    say(f"pid {os.getpid()} waiting for a signal")
    deadline = time.monotonic() + 150
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    if not received:
        say("no signal came")
        return 1
    say(f"got {received[0]} in pid {os.getpid()} (step {os.environ.get('SLURM_STEP_ID')}); stopping for a requeue")
    return 75


if __name__ == "__main__":
    raise SystemExit(main())
