"""One curve for one config, whatever the layout: data parallel, gradient accumulation, TP x PP,
sequence parallelism and activation checkpointing all train what a single process trains.

Every run is the same 6 steps: micro batch 2, global batch 8 (accumulation 4 in one process, 2 at
DP=2), validation at steps 3 and 6, fp32 on CPU. Tolerance as in test_sft: losses within 1e-4
absolute, grad norms within 1e-4 relative (measured differences are ~1e-6, fp32 summation order).
"""
import pytest

from nemo_ft.nemo_archive import adapter_tensors
from tests.conftest import read_metrics, run_stage

pytestmark = pytest.mark.e2e

SHORT = ("trainer.enable_progress_bar=false", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "model.micro_batch_size=2", "model.global_batch_size=8")
TOL = 1e-4


def _sft(run_dir, *overrides, nproc=1):
    run_stage("sft", f"run.dir={run_dir}", *SHORT, *overrides, nproc=nproc)
    return run_dir


def assert_same_curve(a, b):
    (ta, va), (tb, vb) = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == list(range(1, 7))
    assert [r["step"] for r in va] == [r["step"] for r in vb] == [3, 6]
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
