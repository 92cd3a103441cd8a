"""Multi-node launch on a real two-node SLURM (.ci/slurm2_up.sh): two slurmd "nodes" in two network
namespaces, each with its own IP and hostname, one slurmctld. Used only when that cluster is up;
NEMO_FT_REQUIRE_SLURM2=1 (CI) makes its absence a failure."""
import os
import re
import subprocess
import sys

import pytest

from nemo_ft.nemo_archive import NemoArchive
from tests.conftest import REPO, read_metrics, stage_env
from tests.slurm import jobs

CONF = jobs.TWO_NODE_CONF
NODES = {"nemoft-n1": "10.77.0.11", "nemoft-n2": "10.77.0.12"}
SLURM2_READY = os.path.exists(CONF) and jobs.up_nodes(CONF) == 2
if not SLURM2_READY and os.environ.get("NEMO_FT_REQUIRE_SLURM2"):
    raise RuntimeError("NEMO_FT_REQUIRE_SLURM2 is set (CI) but the two-node SLURM is not up: run .ci/slurm2_up.sh")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SLURM2_READY, reason="no two-node SLURM here (bash .ci/slurm2_up.sh starts one)")]

# 200 steps with validation (and a checkpoint) every 20: long enough (~17 s of training) to requeue
# mid-run. The LR schedule depends on max_steps, so the reference uses the same.
TRAIN = ("trainer.max_steps=200", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false")
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--requeue", "--open-mode=append")


def _ranks(log: str) -> dict:
    """{rank: (hostname, ip)} from the line each srun task prints (slurm/_task.sh)."""
    found = re.findall(r"\[nemo-ft slurm\] rank (\d+)/2 on (\S+) \((\S+)\) node (\d+)", log)
    return {int(r): (host, ip, int(node)) for r, host, ip, node in found}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """At once (CI time): the single-process reference (its own torch world of one, no SLURM), a 2-node
    PP=2 job requeued once it is past its first checkpoint, and the signal probe on both nodes."""
    root = tmp_path_factory.mktemp("two_nodes")
    ref = subprocess.Popen([sys.executable, "-m", "nemo_ft.stages.sft", f"run.dir={root / 'ref'}", *TRAIN],
                           cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ids = {}
    try:
        ids["pp2"] = jobs.submit(*TWO_NODES, f"--output={root}/pp2.out", "slurm/sft_lora.sh", "parallel=cpu_pp2_2nodes",
                                 f"run.dir={root / 'pp2'}", *TRAIN, conf=CONF)
        # sft_lora.sh's own header (--signal=B:USR1@120, --requeue) under a 2-minute limit: the signal
        # comes at SLURM's next timer tick; a payload stands in for the stage (NEMO_FT_STAGE_PKG).
        ids["signal"] = jobs.submit(*TWO_NODES, "--time=2", f"--output={root}/signal.out", "slurm/sft_lora.sh",
                                    f"run.dir={root / 'signal'}", conf=CONF, NEMO_FT_STAGE_PKG="tests.slurm.payloads")
        requeued_at = _requeue_past_first_checkpoint(ids["pp2"], root / "pp2")
        ended = jobs.wait_all(list(ids.values()), 300, CONF, rerun_now=True)
        states = {name: ended[i] for name, i in ids.items()}
        assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    finally:
        jobs.cancel(*ids.values(), conf=CONF)
        ref.kill()
    logs = {name: (root / f"{name}.out").read_text() for name in ids}
    return root, ids, states, logs, requeued_at


def _requeue_past_first_checkpoint(job_id, run_dir, timeout=240):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            steps = [r["step"] for r in read_metrics(run_dir)[0]]
        except (FileNotFoundError, ValueError):  # not there yet, or a line caught half-written
            steps = []
        ckpts = list((run_dir / "nemo" / "checkpoints").rglob("*-last.ckpt"))  # one per rank: tp_rank_XX_pp_rank_YYY/
        if ckpts and len(steps) >= 30 and jobs.job(job_id, CONF)["JobState"] == "RUNNING":
            subprocess.run(["scontrol", "requeue", job_id], check=True, env=jobs.env(CONF))
            return steps[-1]
        assert len(steps) < 200, "the job ended before it could be requeued"
        time.sleep(0.1)
    raise AssertionError("no checkpoint to requeue at")


def test_pp2_across_two_nodes_equals_the_single_process_run(runs):
    root, ids, states, logs, _ = runs
    log, st = logs["pp2"], states["pp2"]
    assert (st["JobState"], st["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    # One rank per node, each in its own network namespace: its own hostname and address.
    ranks = _ranks(log)
    assert ranks == {0: ("nemoft-n1", NODES["nemoft-n1"], 0), 1: ("nemoft-n2", NODES["nemoft-n2"], 1)}, log[-3000:]
    assert f"rendezvous nemoft-n1:{20000 + int(ids['pp2']) % 10000}" in log
    # The same curve as one process on one node (PP=2 starts from TP=1's weights, nemo_ft.runtime),
    # requeue and all (the next test: a resume continues the uninterrupted curve).
    train, val = read_metrics(root / "pp2")
    ref_train, ref_val = read_metrics(root / "ref")
    assert [r["step"] for r in train] == [r["step"] for r in ref_train] == list(range(1, 201))
    for a, b in zip(ref_train, train):
        assert b["reduced_train_loss"] == pytest.approx(a["reduced_train_loss"], abs=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert (b["lr"], b["consumed_samples"]) == pytest.approx((a["lr"], a["consumed_samples"]), rel=1e-6)
    last_val = {r["step"]: r["val_loss"] for r in val}  # a step validated twice (before and after the requeue)
    ref = {r["step"]: r["val_loss"] for r in ref_val}
    assert {k: last_val[k] for k in ref} == pytest.approx(ref, abs=1e-4)
    # Lightning also validates the step a stop lands on (the requeue's SIGTERM): only that one is extra.
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", log)
    assert stopped and set(last_val) - set(ref) <= {int(stopped.group(1))}, (sorted(last_val), log[-3000:])
    # The adapter holds both pipeline stages' shards, each saved by the rank on its node.
    with NemoArchive(root / "pp2" / "adapter.nemo") as archive:
        layout = archive.layout()
        shards = archive.tensors()
    assert (layout.kind, layout.tp, layout.pp) == ("tp_pp", 1, 2)
    assert sorted(shards) == ["tp_rank_00_pp_rank_000/model_weights.ckpt", "tp_rank_00_pp_rank_001/model_weights.ckpt"]
    assert all(len(sd) == 2 and all(t.numel() for t in sd.values()) for sd in shards.values())


def test_requeued_two_node_job_resumes_from_its_checkpoint(runs):
    root, ids, states, logs, requeued_at = runs
    job_id, log, st = ids["pp2"], logs["pp2"], states["pp2"]
    assert (st["JobState"], st["ExitCode"], st["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    first, rerun = log.split(f"job {job_id} restart 1", 1)
    assert _ranks(first) == _ranks(rerun) and len(_ranks(rerun)) == 2  # both attempts on both nodes
    restored = set(re.findall(r"Restoring states from the checkpoint path at \S+-step=(\d+)-\S+-last\.ckpt", rerun))
    assert len(restored) == 1 and "Restoring states" not in first, rerun[-3000:]
    c = int(restored.pop())
    # The requeue's SIGTERM reached both ranks inside srun: they finished the step they were on, wrote
    # the checkpoint of that step and exited 75 (callbacks.Preemption), so the rerun resumes there.
    stopped = set(re.findall(r"stopped by SIGTERM after step (\d+)", first))
    assert stopped == {str(c)} and requeued_at <= c < 200, (stopped, c, requeued_at)
    # The steps the first attempt ran after checkpoint c were dropped and rerun: each step once, and
    # (previous test) each equal to the uninterrupted single-process run.
    train, _ = read_metrics(root / "pp2")
    assert [r["step"] for r in train] == list(range(1, 201))


def test_signal_reaches_the_tasks_inside_srun_on_both_nodes_and_the_job_requeues(runs):
    """SLURM signals the batch shell (120 s >= the 2-minute limit: at its next timer tick); _launch.sh
    passes SIGUSR1 into srun; each task, on its own node, receives it in its own process (the one srun
    exec'd), stops with 75 as a stage that checkpointed would, and the job requeues and completes."""
    _, ids, states, logs, _ = runs
    job_id, log, st = ids["signal"], logs["signal"], states["signal"]
    assert (st["JobState"], st["ExitCode"], st["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    first, rerun = log.split(f"job {job_id} restart 1", 1)
    assert f"job {job_id} got SIGUSR1: passing it on to the stage" in first
    got = re.findall(r"\[payload\] rank (\d) on (\S+): got (SIG\w+) in pid (\d+) \(step (\d+)\)", first)
    waiting = dict(re.findall(r"\[payload\] rank (\d) on \S+: pid (\d+) waiting", first))
    assert sorted((r, host, sig) for r, host, sig, _, _ in got) == [("0", "nemoft-n1", "SIGUSR1"),
                                                                      ("1", "nemoft-n2", "SIGUSR1")], first[-3000:]
    assert all(pid == waiting[r] and step == "0" for r, _, _, pid, step in got)
    # srun's status: 75, or 143 when one task's 75 reached srun first and --kill-on-bad-exit stopped the
    # other as it was exiting (seen once on a loaded machine); _launch.sh requeues on either.
    assert re.search(rf"\(exit (75|143); 75: checkpointed\): requeueing job {job_id}", first), first[-3000:]
    assert rerun.count("restart 1: resumed, done") == 2


def test_layout_mismatch_is_refused_before_anything_starts(tmp_path):
    """parallel=cpu_pp2 (2 devices on 1 node) on 2 nodes x 1 task: both problems named, exit 2."""
    log = tmp_path / "job.out"
    job_id = jobs.submit("--nodes=2", "--ntasks-per-node=1", f"--output={log}", "slurm/sft_lora.sh",
                         "parallel=cpu_pp2", f"run.dir={tmp_path / 'run'}", conf=CONF)
    st = jobs.wait_done(job_id, 120, CONF)
    text = log.read_text()
    # Each rank exits 2; srun reports the highest status, 143 if --kill-on-bad-exit stopped a rank first.
    assert st["JobState"] == "FAILED" and st["ExitCode"] in ("2:0", "143:0"), text[-3000:]
    assert "trainer.num_nodes: SLURM started this job step on 2 node(s) but trainer.num_nodes = 1" in text
    assert "trainer.devices: SLURM placed 1,1 task(s) on its 2 node(s) but trainer.devices = 2" in text
    assert "Traceback" not in text and not (tmp_path / "run" / "nemo").exists()


def test_heterogeneous_ppo_job_actor_finds_the_server_by_hostname(tmp_path):
    """slurm/rlhf_ppo.sh with payloads for critic_server and ppo: the critic server on one node, the actor on
    the other, which reaches it through the first host of the server's component."""
    log = tmp_path / "job.out"
    # One component per node (sbatch's `A : B` sets each component's options over the script's).
    job_id = jobs.submit(f"--output={log}", "--nodelist=nemoft-n1", ":", "--nodelist=nemoft-n2", "slurm/rlhf_ppo.sh",
                         f"run.dir={tmp_path / 'run'}", conf=CONF, NEMO_FT_STAGE_PKG="tests.slurm.payloads",
                         CRITIC_PORT="5599")
    st = jobs.wait_done(job_id, 120, CONF)
    text = log.read_text()
    assert (st["JobState"], st["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    served = re.search(r"\[payload\] rank 0 on (\S+): critic serving on port 5599 \(rendezvous (\S+):", text)
    reached = re.search(r"\[payload\] rank 0 on (\S+): actor \(rendezvous (\S+):\d+\) reached (\S+):5599: "
                        r"critic on (\S+)", text)
    assert served and reached, text[-3000:]
    assert served.group(1) == served.group(2) == reached.group(3) == reached.group(4)  # found by hostname
    assert reached.group(1) == reached.group(2) != served.group(1)  # the actor ran on the other node
