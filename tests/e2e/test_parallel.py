"""One curve for one config, whatever the layout: data parallel, gradient accumulation, TP x PP,
sequence parallelism and activation checkpointing all train what a single process trains.

Every run is the same 6 steps: micro batch 2, global batch 8 (accumulation 4 in one process, 2 at
DP=2), validation at steps 3 and 6, fp32 on CPU. Tolerance as in test_sft: losses within 1e-4
absolute, grad norms within 1e-4 relative (measured differences are ~1e-6, fp32 summation order).
"""
import subprocess
import sys
import time

import pytest

from nemo_ft.nemo_archive import adapter_tensors
from tests.conftest import REPO, _free_port, read_metrics, run_stage, stage_env, trained_past

pytestmark = pytest.mark.e2e

BATCH = ("trainer.enable_progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=8")
SHORT = (*BATCH, "trainer.max_steps=6", "trainer.val_check_interval=3")
TOL = 1e-4


def _sft(run_dir, *overrides, nproc=1):
    run_stage("sft", f"run.dir={run_dir}", *SHORT, *overrides, nproc=nproc)
    return run_dir


def assert_same_curve(a, b, steps=6, every=3):
    (ta, va), (tb, vb) = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == list(range(1, steps + 1))
    assert [r["step"] for r in va] == [r["step"] for r in vb] == list(range(every, steps + 1, every))
    for x, y in zip(ta, tb):
        assert y["reduced_train_loss"] == pytest.approx(x["reduced_train_loss"], abs=TOL), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=TOL), x["step"]
        assert y["grad_norm"] > 0, x["step"]  # something trained
    for x, y in zip(va, vb):
        assert y["val_loss"] == pytest.approx(x["val_loss"], abs=TOL), x["step"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 4 micro batches accumulated per step."""
    return _sft(tmp_path_factory.mktemp("one_process"))


@pytest.mark.parametrize("name,overrides,nproc", [
    ("dp2", ["trainer.devices=2"], 2),                                 # accumulation 2 per rank
    ("dp2_tp2", ["parallel=cpu_tp2", "trainer.devices=4"], 4),
    ("one_micro_batch", ["model.micro_batch_size=8"], 1),              # no accumulation
])
def test_data_parallel_and_accumulation_train_the_one_process_curve(one_process, tmp_path, name, overrides, nproc):
    assert_same_curve(one_process, _sft(tmp_path, *overrides, nproc=nproc))


def test_nemos_own_loss_averages_micro_batch_means_so_it_depends_on_the_layout(one_process, tmp_path):
    """What run.loss_per_token=true fixes (nemo_ft/runtime/patches.py TOKEN_MEAN_LOSS): NeMo's step
    loss is the mean of each micro batch's own token mean, and its sampler deals samples to DP ranks
    by stride, so DP=2 groups other samples than DP=1 and trains another curve."""
    dp1 = _sft(tmp_path / "dp1", "run.loss_per_token=false")
    dp2 = _sft(tmp_path / "dp2", "run.loss_per_token=false", "trainer.devices=2", nproc=2)
    first = [read_metrics(r)[0][0]["reduced_train_loss"] for r in (one_process, dp1, dp2)]
    assert abs(first[1] - first[2]) > 0.05, first  # NeMo's: DP changes the loss of the same 8 samples (0.22)
    assert abs(first[0] - first[1]) > 100 * TOL, first  # token mean != mean of micro batch means (0.012)


def test_tp2_pp2_trains_the_one_process_curve_and_saves_four_shards(one_process, tmp_path):
    assert_same_curve(one_process, _sft(tmp_path, "parallel=cpu_tp2_pp2", nproc=4))
    shards = adapter_tensors(tmp_path / "adapter.nemo")
    assert sorted(shards) == [f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for t in (0, 1) for p in (0, 1)]
    assert all(len(sd) == 2 and all(t.numel() > 0 for t in sd.values()) for sd in shards.values())


def test_sequence_parallel_trains_the_one_process_curve(one_process, tmp_path):
    """TP=2 with the sequence split over the TP ranks (norms and dropout on shards, all-gather before
    the column-parallel layers, reduce-scatter after the row-parallel ones), over gloo, without TE."""
    assert_same_curve(one_process, _sft(tmp_path, "parallel=cpu_tp2", "model.sequence_parallel=true", nproc=2))


@pytest.mark.parametrize("granularity,method,layers", [("full", "uniform", 1), ("selective", None, None)])
def test_activation_checkpointing_trains_the_one_process_curve(one_process, tmp_path, granularity, method, layers):
    """Full checkpointing once trained nothing here (grad norm 0.0: Megatron's reentrant checkpoint
    gives no adapter a gradient when the frozen base's embedding output needs none; patches.py)."""
    assert_same_curve(one_process, _sft(tmp_path, f"model.activations_checkpoint_granularity={granularity}",
                                        f"model.activations_checkpoint_method={method or 'null'}",
                                        f"model.activations_checkpoint_num_layers={layers or 'null'}"))


def test_a_rank_killed_mid_run_stops_its_peer_in_seconds_and_the_rerun_continues_the_curve(tmp_path_factory, tmp_path):
    """kill -9 of one rank of two started by hand (no torchrun or srun --kill-on-bad-exit to stop the
    other): the survivor ends within seconds with a message that says what happened, not a hang in a
    collective; the same command then resumes from the newest complete checkpoint onto the curve one
    uninterrupted process trains."""
    steps = (*BATCH, "trainer.max_steps=40", "trainer.val_check_interval=10")  # checkpoints at 10, 20, 30
    reference = tmp_path_factory.mktemp("uninterrupted")
    run_stage("sft", f"run.dir={reference}", *steps)
    run_dir, port, procs = tmp_path / "run", _free_port(), []
    cmd = [sys.executable, "-m", "nemo_ft.stages.sft", f"run.dir={run_dir}", *steps, "trainer.devices=2"]
    for rank in (0, 1):
        env = {**stage_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        ready, deadline = trained_past(run_dir, 12), time.monotonic() + 300
        while time.monotonic() < deadline and not ready() and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        assert ready() and all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
        procs[1].kill()
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = (tmp_path / "rank0.log").read_text()
    assert rc == 1 and took < 30, (rc, took, out[-3000:])  # measured: 3 s
    assert "rank 0 lost another process of this job (" in out and "rerun the same command" in out, out[-3000:]
    assert not (run_dir / "adapter.nemo").exists() and not (run_dir / "manifest.json").exists()

    run_stage("sft", f"run.dir={run_dir}", *steps, "trainer.devices=2", nproc=2)
    assert_same_curve(reference, run_dir, steps=40, every=10)
