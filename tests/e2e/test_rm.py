"""`nemo-ft rm`: NeMo-Aligner's binary-ranking reward model, full-parameter on the tiny base, learns the
lookup preferences (the asked-for town over the other field's value) and its saved .nemo scores held-out
pairs the right way round; Aligner's small-data and CPU edges are refused before anything starts."""
import json

import pytest

from tests.conftest import PREF_INPUTS, model_probe, read_jsonl, read_metrics, run_stage, assert_refused

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_rm")
    run_stage("prep", "task=rm", f"out_dir={out}", "progress=false", "seq_length=128", PREF_INPUTS)
    return out


@pytest.fixture(scope="module")
def rm_run(pairs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm")
    run_stage("rm", f"data_dir={pairs}", f"run.dir={run_dir}", "trainer.rm.max_steps=40", "trainer.rm.val_check_interval=10")
    return run_dir


def test_reward_model_learns_the_preference_on_held_out_pairs(rm_run):
    train, val = read_metrics(rm_run)
    assert len(train) == 40 and [r["step"] for r in val] == [0, 10, 20, 30, 40]  # step 0: before any update
    assert val[-1]["acc"] >= 0.9 and val[-1]["acc"] > val[0]["acc"]
    assert val[-1]["loss"] < val[0]["loss"] - 0.3
    assert val[-1]["rewards_chosen_mean"] > val[-1]["rewards_rejected_mean"]
    m = json.loads((rm_run / "manifest.json").read_text())
    assert {"reward_model", "rm_png", "metrics"} <= {r["role"] for r in m["outputs"]}
    # full-parameter distributed checkpoints (with plain Adam's state) were saved
    assert [p for p in (rm_run / "nemo" / "checkpoints").iterdir() if p.is_dir() and p.name.endswith("-last")]


def test_saved_reward_model_restores_and_ranks_held_out_pairs(rm_run, pairs, tmp_path):
    texts = [r["text"] for r in read_jsonl(pairs / "test.jsonl")]
    rewards = model_probe(tmp_path, rm_run / "rm.nemo", "reward", texts)["rewards"]
    assert len(rewards) == len(texts) == 80
    right = sum(c > r for c, r in zip(rewards[0::2], rewards[1::2]))
    assert right >= 36, right  # of 40 held-out pairs (measured: 40)




def test_aligners_reward_model_edges_are_refused_up_front(pairs, tmp_path):
    def rm(*args, data=f"data_dir={pairs}"):
        return run_stage("rm", data, f"run.dir={tmp_path / 'run'}", *args, check=False, timeout=120)
    assert_refused(rm("model.global_batch_size=256"), "holds 240 pair(s), fewer than one batch (model.global_batch_size=256)")
    assert_refused(rm("model.micro_batch_size=2"), "model.micro_batch_size: > 1 fails", "Transformer Engine")
    assert_refused(rm("model.data.seq_length=10"), "longer than model.data.seq_length=10", "skip each and the pair after it")
    assert_refused(rm("trainer.rm.val_check_interval=7", "trainer.rm.save_interval=10"), "must be a multiple of")
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(pairs / "train.jsonl")[:9]))
    assert_refused(rm("model.global_batch_size=4", data=f"model.data.data_prefix={{train: [{odd}], validation: "
                                                 f"[{pairs / 'validation.jsonl'}], test: [{odd}]}}"),
             "odd number of lines")
    assert not (tmp_path / "run" / "nemo").exists()
