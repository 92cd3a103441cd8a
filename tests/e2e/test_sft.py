"""LoRA SFT end to end on the tiny base through NeMo's real path on CPU (subprocesses, gloo)."""
import json
import tarfile

import pytest

from nemo_ft.nemo_archive import adapter_tensors
from tests.conftest import SFT_FAST, assert_refused, read_metrics, run_stage, tiny_lora_params

pytestmark = pytest.mark.e2e

# LoRA r=32 on attention_qkv of the tiny base (conf/peft/lora.yaml): per layer A [32, h], B [qkv, 32].
TINY_LORA_QKV_R32 = tiny_lora_params(["attention_qkv"], 32)


def assert_same_curves(run_a, run_b, tol=1e-4):
    """Two runs of the same config on different layouts: equal train/validation curves."""
    t1, v1 = read_metrics(run_a)
    t2, v2 = read_metrics(run_b)
    assert len(t1) == len(t2) == 60 and len(v1) == len(v2)
    for a, b in zip(t1, t2):
        assert b["reduced_train_loss"] == pytest.approx(a["reduced_train_loss"], abs=tol), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tol), a["step"]
    for a, b in zip(v1, v2):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=tol)


def assert_continues_the_curve(reference, resumed, steps=60):
    """A stopped-and-resumed run ends on the uninterrupted run's curve: every step once, equal losses."""
    t_ref, v_ref = read_metrics(reference)
    t_res, v_res = read_metrics(resumed)
    assert [r["step"] for r in t_res] == list(range(1, steps + 1))
    for a, b in zip(t_ref, t_res):
        assert b["reduced_train_loss"] == pytest.approx(a["reduced_train_loss"], rel=1e-6, abs=1e-7), a["step"]
    assert v_res[-1]["val_loss"] == pytest.approx(v_ref[-1]["val_loss"], abs=1e-6)


def _summary(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["summary"]


def test_lora_sft_loss_falls_and_adapter_written(sft_tp1):
    train, val = read_metrics(sft_tp1)
    assert [r["step"] for r in train] == list(range(1, 61))
    first = train[0]["reduced_train_loss"]
    last10 = sum(r["reduced_train_loss"] for r in train[-10:]) / 10
    # Measured: 5.62 at step 1, ~2.34 over the last ten steps. Demand at least a 40% drop.
    assert first > 5.0
    assert last10 < 0.6 * first, (first, last10)
    assert [r["step"] for r in val] == [20, 40, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.1
    assert (sft_tp1 / "adapter.nemo").stat().st_size > 0
    # TensorBoard events from NeMo's exp_manager.
    assert list((sft_tp1 / "nemo").glob("events.out.tfevents.*"))


def test_adapter_holds_only_adapter_weights_and_base_is_frozen(sft_tp1):
    adapter = sft_tp1 / "adapter.nemo"
    with tarfile.open(adapter) as tar:
        names = [n.lstrip("./") for n in tar.getnames()]
    assert "model_config.yaml" in names
    weights = adapter_tensors(adapter)["model_weights.ckpt"]
    assert all("adapter_layer.lora_kqv_adapter" in k for k in weights), sorted(weights)
    assert len(weights) == 4  # linear_in + linear_out, 2 layers
    assert sum(t.numel() for t in weights.values()) == TINY_LORA_QKV_R32
    # The B matrices start at zero (row_init_method=zero): non-zero now means they trained.
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "linear_out" in k)
    summary = _summary(sft_tp1)
    assert summary["frozen_params_unchanged"] is True
    assert summary["trainable_params_changed"] is True
    assert summary["trainable_params_per_rank"] == TINY_LORA_QKV_R32


def test_planner_predicts_measured_bytes_exactly(sft_tp1):
    summary = _summary(sft_tp1)
    measured, planned = summary["memory_measured"], summary["memory_planned"]
    assert measured["trainable_params"] == planned["trainable_params"] == TINY_LORA_QKV_R32
    assert measured["grad_bytes"] == planned["grad_bytes"] == 4 * TINY_LORA_QKV_R32  # fp32 grads
    assert measured["optimizer_bytes"] == planned["optimizer_bytes"] == 8 * TINY_LORA_QKV_R32  # Adam m, v


def test_round_trip_restore_gives_final_validation_loss(sft_tp1, tmp_path):
    _, val = read_metrics(sft_tp1)
    proc = run_stage("sft", f"run.dir={tmp_path}", "run.validate_only=true", "trainer.enable_progress_bar=false",
                     f"model.peft.restore_from_path={sft_tp1 / 'adapter.nemo'}")
    line = [ln for ln in proc.stdout.splitlines() if "validation loss of base +" in ln][-1]
    restored = float(line.rsplit(":", 1)[1])
    assert restored == pytest.approx(val[-1]["val_loss"], abs=1e-5)
    # And the adapter matters: the base alone is clearly worse on the same data.
    base = run_stage("sft", f"run.dir={tmp_path / 'base'}", "run.validate_only=true", "peft=none",
                     "trainer.enable_progress_bar=false")
    base_loss = float([ln for ln in base.stdout.splitlines() if "validation loss of base +" in ln][-1].rsplit(":", 1)[1])
    assert base_loss > restored + 0.1


def test_tp2_matches_tp1_and_saves_both_ranks(sft_tp1, sft_tp2):
    assert_same_curves(sft_tp1, sft_tp2)
    shards = adapter_tensors(sft_tp2 / "adapter.nemo")
    assert sorted(shards) == ["mp_rank_00/model_weights.ckpt", "mp_rank_01/model_weights.ckpt"]
    for sd in shards.values():
        assert len(sd) == 4 and all(t.numel() > 0 for t in sd.values())
    assert sum(t.numel() for sd in shards.values() for t in sd.values()) == TINY_LORA_QKV_R32


def test_tp2_adapter_round_trip(sft_tp2, tmp_path):
    _, val = read_metrics(sft_tp2)
    proc = run_stage("sft", f"run.dir={tmp_path}", "parallel=cpu_tp2", "run.validate_only=true",
                     "trainer.enable_progress_bar=false", f"model.peft.restore_from_path={sft_tp2 / 'adapter.nemo'}",
                     nproc=2)
    line = [ln for ln in proc.stdout.splitlines() if "validation loss of base +" in ln][-1]
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(val[-1]["val_loss"], abs=1e-5)


def test_other_peft_schemes_train_and_save(tmp_path):
    for scheme in ("ia3", "adapter", "ptuning"):
        run_dir = tmp_path / scheme
        run_stage("sft", f"run.dir={run_dir}", f"peft={scheme}", "trainer.enable_progress_bar=false",
                  "trainer.max_steps=10", "trainer.val_check_interval=10")
        train, _ = read_metrics(run_dir)
        assert train[-1]["reduced_train_loss"] < train[0]["reduced_train_loss"]
        summary = _summary(run_dir)
        assert summary["peft_scheme"] == scheme and summary["saved"]["params"] > 0
        assert summary["frozen_params_unchanged"] is True


@pytest.mark.parametrize("stop_at", [10, 13])
def test_resume_matches_uninterrupted_run(tmp_path, stop_at):
    """Stop after N steps (a preempted job), rerun the same command: the curve equals an unbroken run.

    13 is not a validation step: before our sampler fix that resume crashed, at 10 the data repeated.
    """
    common = ("trainer.enable_progress_bar=false", "trainer.max_steps=20", "trainer.val_check_interval=10")
    full, broken = tmp_path / "full", tmp_path / "broken"
    run_stage("sft", f"run.dir={full}", *common)
    run_stage("sft", f"run.dir={broken}", *common, f"run.stop_after_steps={stop_at}")
    first, _ = read_metrics(broken)
    assert first[-1]["step"] == stop_at
    run_stage("sft", f"run.dir={broken}", *common)
    t_full, v_full = read_metrics(full)
    t_res, v_res = read_metrics(broken)
    assert [r["step"] for r in t_res] == list(range(1, 21))
    for a, b in zip(t_full, t_res):
        for key in ("reduced_train_loss", "grad_norm", "lr", "consumed_samples"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    final = {r["step"]: r["val_loss"] for r in v_res}
    assert final[20] == pytest.approx(v_full[-1]["val_loss"], abs=1e-6)


def test_pp2_matches_tp1_and_saves_both_stages(sft_tp1, tmp_path):
    """Adapters are seeded per global layer (nemo_ft.runtime), so PP=2 starts from TP=1's weights."""
    run_stage("sft", f"run.dir={tmp_path}", "parallel=cpu_pp2", *SFT_FAST, nproc=2)
    assert_same_curves(sft_tp1, tmp_path)
    shards = adapter_tensors(tmp_path / "adapter.nemo")
    assert sorted(shards) == ["tp_rank_00_pp_rank_000/model_weights.ckpt", "tp_rank_00_pp_rank_001/model_weights.ckpt"]
    assert all(len(sd) == 2 for sd in shards.values())  # one layer's linear_in + linear_out per stage


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_checkpoints_at_the_step_and_the_rerun_continues_the_curve(sft_tp1, tmp_path, sig):
    """What SLURM sends before the time limit (--signal=B:USR1@T, passed on by slurm/_launch.sh) or on
    preemption (SIGTERM) reaches a running CPU job: it finishes the step, writes NeMo's -last checkpoint,
    saves no adapter and exits 75; the same command again ends on the uninterrupted run's curve."""
    from tests.conftest import signal_mid_run, trained_past

    code, err, _ = signal_mid_run("sft", f"run.dir={tmp_path}", *SFT_FAST, ready=trained_past(tmp_path, 25), sig=sig,
                                  log=tmp_path.parent / f"{sig}.log")
    assert code == 75, err[-3000:]
    stopped = int(err.split(f"stopped by {sig} after step ")[1].split(";")[0])
    assert 25 <= stopped < 60 and "rerun the same command to resume" in err
    train, _ = read_metrics(tmp_path)
    assert train[-1]["step"] == stopped  # it stopped at the step boundary it names
    assert not (tmp_path / "adapter.nemo").exists() and not (tmp_path / "manifest.json").exists()
    assert [p for p in (tmp_path / "nemo").rglob("*-last*")], "no -last checkpoint to resume from"

    run_stage("sft", f"run.dir={tmp_path}", *SFT_FAST)
    assert_continues_the_curve(sft_tp1, tmp_path)


def test_an_adapter_at_another_layout_is_refused_and_its_tp1_export_gives_the_same_loss(sft_tp1, sft_tp2, tmp_path):
    """NeMo loads PEFT weights per rank without resharding (#8642, #10280): a TP=2 adapter at TP=1, or a
    TP=1 adapter at TP=2, is refused before anything starts, naming both layouts and the conversion;
    the conversion (export's adapter_tp1.nemo) validates at TP=1 to the TP=2 run's own loss."""
    assert_refused(run_stage("sft", f"run.dir={tmp_path / 'a'}", "run.validate_only=true",
                            f"model.peft.restore_from_path={sft_tp2 / 'adapter.nemo'}", check=False, timeout=300),
                  "adapter.nemo was saved at TP=2 PP=1; this run is TP=1 PP=1", "adapter_tp1.nemo")
    assert_refused(run_stage("sft", f"run.dir={tmp_path / 'b'}", "run.validate_only=true", "parallel=cpu_tp2",
                            f"model.peft.restore_from_path={sft_tp1 / 'adapter.nemo'}", nproc=2, check=False,
                            timeout=300),
                  "adapter.nemo was saved at TP=1 PP=1; this run is TP=2 PP=1", torchrun=True)
    run_stage("export", f"from_run={sft_tp2}", f"out_dir={tmp_path / 'export'}", timeout=300)
    proc = run_stage("sft", f"run.dir={tmp_path / 'c'}", "run.validate_only=true", "trainer.enable_progress_bar=false",
                     f"model.peft.restore_from_path={tmp_path / 'export' / 'adapter_tp1.nemo'}")
    line = [ln for ln in proc.stdout.splitlines() if "validation loss of base +" in ln][-1]
    _, val = read_metrics(sft_tp2)
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(val[-1]["val_loss"], abs=1e-4)  # TP=2 vs TP=1 sums


def test_resuming_checkpoints_at_another_layout_is_refused(sft_tp1, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(sft_tp1, run_dir)
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert_refused(run_stage("sft", f"run.dir={run_dir}", "parallel=cpu_tp2", *SFT_FAST, nproc=2, check=False,
                            timeout=300),
                  "holds checkpoints written at TP=1 PP=1; this run asks TP=2 PP=1", "Rerun at TP=1 PP=1",
                  torchrun=True)
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing touched, the manifest kept


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_complete_one(sft_tp1, tmp_path):
    """A crash while the newest -last.ckpt was written (here: truncated): the rerun says so, keeps it as
    *.torn, resumes from the newest checkpoint complete on every rank (the top-k copy NeMo wrote at the
    stop, step 30: the stop validated) instead of crashing in torch.load or starting over, and ends on the
    uninterrupted curve."""
    run_stage("sft", f"run.dir={tmp_path}", *SFT_FAST, "run.stop_after_steps=30")
    ckpts = tmp_path / "nemo" / "checkpoints"
    (last,) = [p for p in ckpts.rglob("*-last.ckpt")]
    assert "step=30" in last.name
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    proc = run_stage("sft", f"run.dir={tmp_path}", *SFT_FAST)
    assert "the newest checkpoint is incomplete" in proc.stdout and "(step 30)" in proc.stdout, proc.stdout[-3000:]
    assert (ckpts / (last.name + ".torn")).exists()
    assert_continues_the_curve(sft_tp1, tmp_path)
