"""`nemo-ft dpo` through NeMo-Aligner 0.7.0 on the tiny base: learnable preferences (the asked-for town over
the other field's value), the SFT adapter merged into the reference, Aligner's failure modes up front.

Tolerances: step-0 loss = ln 2 within 1e-4 and rewards 0 within 1e-6 (policy == reference exactly, only
fp32 summation noise); TP=2 vs TP=1 losses within 1e-4 (the SFT tests' tolerance)."""
import json
import math

import pytest

from tests.conftest import LOOKUP_LORA, PREF_INPUTS, assert_refused, read_metrics, run_stage

pytestmark = pytest.mark.e2e

FAST = ("trainer.enable_progress_bar=false", "trainer.dpo.val_check_interval=10")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_dpo")
    run_stage("prep", "task=dpo", f"out_dir={out}", "progress=false", "seq_length=128", PREF_INPUTS)
    return out


@pytest.fixture(scope="module")
def dpo_run(lookup_pipeline, prefs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo")
    run_stage("dpo", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={prefs}", f"run.dir={run_dir}", *FAST,
              "trainer.dpo.max_steps=20")
    return run_dir


def test_dpo_from_sft_starts_at_ln2_learns_and_changes_only_lora(dpo_run):
    train, val = read_metrics(dpo_run)
    assert [r["step"] for r in train] == list(range(20))
    first = train[0]
    # the SFT adapter is in the reference: policy == reference at step 0
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards_chosen_mean"] == pytest.approx(0, abs=1e-6)
    assert first["rewards_rejected_mean"] == pytest.approx(0, abs=1e-6)
    late = sum(r["preference_loss"] for r in train[-5:]) / 5
    assert late < math.log(2) - 0.05, late  # the preference is learned...
    assert [r["step"] for r in val] == [10, 20]
    assert val[-1]["acc"] > 0.75 and val[-1]["rewards_chosen_mean"] > val[-1]["rewards_rejected_mean"]  # ...held out
    m = json.loads((dpo_run / "manifest.json").read_text())
    s = m["summary"]
    assert s["frozen_params_unchanged"] is True and s["trainable_params_changed"] is True
    assert s["reference"] == "the SFT-merged base" and s["saved"]["params"] > 0
    assert {"adapter", "base", "dpo_png", "metrics"} <= {r["role"] for r in m["outputs"]}
    from nemo_ft.nemo_archive import adapter_tensors
    weights = adapter_tensors(dpo_run / "adapter.nemo")["model_weights.ckpt"]
    assert weights and all("lora_kqv_adapter" in k for k in weights)  # the adapter only, no base weights
    assert (dpo_run / "dpo.png").read_bytes()[:4] == b"\x89PNG"


def test_dpo_adapter_reloads_and_exports(dpo_run, tmp_path):
    out = tmp_path / "export"
    run_stage("export", f"from_run={dpo_run}", f"out_dir={out}")
    m = json.loads((out / "manifest.json").read_text())
    assert m["summary"]["checks"]["nemo_restores_adapter_tp1"]["equal"] is True
    assert m["summary"]["checks"]["hf_peft_vs_nemo_adapter"] < 1e-4
    base = [r for r in m["inputs"] if r["role"] == "base"][0]["path"]
    assert base.endswith("sft_merged_base.nemo")  # the adapter applies to the SFT-merged base


def test_without_the_merge_the_reference_is_not_the_sft_model(lookup_pipeline, prefs, tmp_path):
    """Aligner's own way, the SFT adapter as the policy's starting adapter: the reference lacks it."""
    run_stage("dpo", f"model.peft.restore_from_path={lookup_pipeline / 'sft/adapter.nemo'}", f"data_dir={prefs}",
              f"run.dir={tmp_path}", *FAST, "trainer.dpo.max_steps=1", *LOOKUP_LORA[:2])
    first = read_metrics(tmp_path)[0][0]
    assert abs(first["preference_loss"] - math.log(2)) > 0.01
    assert abs(first["rewards_chosen_mean"]) > 0.01


def test_tp2_equals_tp1(prefs, tmp_path):
    runs = {}
    for name, parallel, nproc in (("tp1", "cpu", 1), ("tp2", "cpu_tp2", 2)):
        run_stage("dpo", f"data_dir={prefs}", f"run.dir={tmp_path / name}", f"parallel={parallel}", *FAST,
                  "trainer.dpo.max_steps=6", "trainer.dpo.val_check_interval=6", nproc=nproc)
        runs[name] = read_metrics(tmp_path / name)
    (t1, v1), (t2, v2) = runs["tp1"], runs["tp2"]
    assert len(t1) == len(t2) == 6
    for a, b in zip(t1 + v1, t2 + v2):
        for key in ("loss", "rewards_chosen_mean", "rewards_rejected_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert t1[-1]["loss"] < t1[0]["loss"]




def test_aligners_failure_modes_are_refused_up_front(lookup_pipeline, prefs, tmp_path):
    def dpo(*args):
        return run_stage("dpo", f"data_dir={prefs}", f"run.dir={tmp_path / 'run'}", *args, check=False, timeout=120)
    assert_refused(dpo("model.global_batch_size=512", "model.micro_batch_size=1"),
             "holds 240 pair(s), fewer than one batch (model.global_batch_size=512)",
             "holds 20 pair(s), fewer than one batch")
    assert_refused(dpo("model.data.seq_length=12"), "pairs are longer than model.data.seq_length=12",
             "zero loss", "model.data.over_length=keep")
    assert_refused(dpo("model.optim.name=distributed_fused_adam"), "model.optim.name: distributed_fused_adam")
    assert_refused(dpo("trainer.dpo.val_check_interval=6", "trainer.dpo.save_interval=20"),
             "trainer.dpo.save_interval: 20 must be a multiple of val_check_interval=6")
    sft_data = lookup_pipeline / "prep" / "train.jsonl"
    assert_refused(run_stage("dpo", f"model.data.data_prefix={{train: [{sft_data}], validation: [{sft_data}], "
                              f"test: [{sft_data}]}}", f"run.dir={tmp_path / 'run'}", check=False, timeout=120),
             "rows lack ['prompt', 'chosen_response', 'rejected_response']", "task=dpo")
    assert_refused(dpo("model.data.append_eod=true"), "was prepared with dpo.append_eod=False")
    assert not (tmp_path / "run" / "nemo").exists()


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_signal_checkpoints_at_the_step_and_the_rerun_continues_the_curve(lookup_pipeline, prefs, dpo_run, tmp_path,
                                                                            sig):
    """SLURM's --signal=B:USR1@T (passed on by slurm/_launch.sh) or a SIGTERM (scancel, preemption) reaches
    a running DPO job: Aligner's loop saves at the step boundary as at its time limit, the stage exits 75
    with no adapter, and the same command again ends on the uninterrupted run's curve (dpo_run: the same
    config, never stopped). RM runs the same loop setup (_aligner.setup_loop)."""
    from tests.conftest import signal_mid_run, trained_past

    args = [f"from_run={lookup_pipeline / 'sft'}", f"data_dir={prefs}", f"run.dir={tmp_path / 'run'}", *FAST,
            "trainer.dpo.max_steps=20"]
    code, out, _ = signal_mid_run("dpo", *args, ready=trained_past(tmp_path / "run", 3), sig=sig,
                                  log=tmp_path / "first.log")
    assert code == 75, out[-3000:]
    stopped = int(out.split(f"stopped by {sig} after step ")[1].split(";")[0])
    assert 3 <= stopped < 20 and not (tmp_path / "run" / "adapter.nemo").exists()
    assert read_metrics(tmp_path / "run")[0][-1]["step"] <= stopped
    run_stage("dpo", *args)
    t_ref, v_ref = read_metrics(dpo_run)
    t_res, v_res = read_metrics(tmp_path / "run")
    assert [r["step"] for r in t_res] == [r["step"] for r in t_ref]
    for a, b in zip(t_ref, t_res):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
    assert v_res[-1]["loss"] == pytest.approx(v_ref[-1]["loss"], abs=1e-5)
