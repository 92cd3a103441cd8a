"""`nemo-ft ppo`: NeMo-Aligner 0.7.0's PPO actor with a LoRA policy from the SFT adapter, against the
critic server the stage starts (`nemo-ft critic_server`: the critic initialized from a `nemo-ft rm`
reward model, serving that model's rewards too), waits for and always stops.

What is asserted is what a few CPU steps can show: rollouts are scored by the reward model, the critic
trains in its own process on the actor's returns (its loss falls), only the actor's adapter moves, the
adapter exports, and no process outlives the run. A reward that rises is REINFORCE's test
(tests/e2e/test_reinforce.py), on the same stage code."""
import json

import pytest

from tests.conftest import (LOOKUP_SPLITS, PREF_INPUTS, assert_refused, leftovers, read_jsonl, read_metrics,
                            run_stage)

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_rlhf")
    run_stage("prep", "task=rlhf", f"out_dir={out}", "template.prompt_template='{input}{output}'", LOOKUP_SPLITS,
              "seq_length=128", "progress=false")
    return out


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_rm")
    run_stage("prep", "task=rm", f"out_dir={root / 'prep'}", "progress=false", "seq_length=128", PREF_INPUTS)
    run_stage("rm", f"data_dir={root / 'prep'}", f"run.dir={root / 'rm'}", "trainer.rm.max_steps=20",
              "trainer.rm.val_check_interval=10")
    return root / "rm"


@pytest.fixture(scope="module")
def ppo_run(lookup_pipeline, prompts, rm_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo")
    proc = run_stage("ppo", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={prompts}", f"run.dir={run_dir}",
                     f"reward.from_run={rm_run}", "trainer.ppo.max_steps=6", "trainer.ppo.val_check_interval=3")
    return run_dir, proc


def test_ppo_trains_the_critic_server_and_only_the_actor_adapter(ppo_run):
    run_dir, proc = ppo_run
    train, val = read_metrics(run_dir)
    assert len(train) == 6 and len(val) == 2
    rewards = [r["rewards"] for r in train]
    assert len(set(rewards)) > 1 and all(abs(r) < 100 for r in rewards)  # the reward model's scores
    s = json.loads((run_dir / "manifest.json").read_text())["summary"]
    assert s["frozen_params_unchanged"] and s["trainable_params_changed"]
    assert s["reward"]["kind"] == "rm" and s["rollouts_per_step"] == 8
    critic = s["critic"]
    assert critic["steps"] == 6 and critic["loss_last"] < critic["loss_first"], critic
    assert s["server"]["stop"]["left"] == [] and "critic server (critic + reward model" in proc.stdout
    assert read_jsonl(run_dir / "rollouts.jsonl")
    assert not leftovers(run_dir)


def test_ppo_adapter_exports(ppo_run, tmp_path):
    run_dir, _ = ppo_run
    run_stage("export", f"from_run={run_dir}", f"out_dir={tmp_path}")
    roles = {r["role"] for r in json.loads((tmp_path / "manifest.json").read_text())["outputs"]}
    assert {"adapter_tp1", "hf_peft"} <= roles, roles


def test_ppo_refuses_what_its_combined_server_cannot_do(lookup_pipeline, prompts, tmp_path):
    def ppo(*args):
        return run_stage("ppo", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={prompts}",
                         f"run.dir={tmp_path / 'run'}", *args, check=False, timeout=120)
    assert_refused(ppo("reward.kind=rule"), "reward.kind: 'rule'", "separate-RM path is broken")
    assert_refused(ppo("reward.model=null"), "reward.model", "reward.from_run")
    assert_refused(ppo(f"reward.model={tmp_path / 'none.nemo'}", "model.global_batch_size=3"),
             "not a multiple of model.global_batch_size=3", "file not found")
    assert not (tmp_path / "run" / "nemo").exists()
