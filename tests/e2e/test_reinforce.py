"""`nemo-ft reinforce`: NeMo-Aligner 0.7.0's REINFORCE actor (RLOO) with a LoRA policy, from the SFT adapter,
against a reward server the stage starts over PyTriton and always stops.

The reward that must be learned is one a tiny model can learn in a CI budget: every lookup prompt has the
same reference (" Paris."), scored by token F1 (reward.kind=rule). Learning it is the proof that rollouts,
rewards, the RLOO advantage and the update agree in sign and reach the adapter."""
import json
import time

import pytest

from tests.conftest import (REPO, SAMPLE, assert_refused, leftovers, read_jsonl, read_metrics, run_stage,
                            signal_mid_run)

pytestmark = pytest.mark.e2e

# Measured (rollout reward, mean of steps 1-5 -> 26-30): 0.024 -> 0.304; validation 0.125 -> 0.333.
# At lr 2e-3 it rises too (0.035 -> 0.081 in 20 steps), too slowly to tell from noise in a CI budget.
LEARN = ("model.optim.lr=3e-3", "trainer.reinforce.max_steps=30", "trainer.reinforce.val_check_interval=10")


@pytest.fixture(scope="module")
def paris(lookup_pipeline, tmp_path_factory):
    """prep task=rlhf of the lookup prompts, every reference " Paris." (SFT's template, so its context ids)."""
    root = tmp_path_factory.mktemp("rlhf_paris")
    for src, role in (("lookup_train", "train"), ("lookup_validation", "validation"), ("lookup_test", "test")):
        with open(root / f"{role}_in.jsonl", "w") as f:
            for row in read_jsonl(SAMPLE / f"{src}.jsonl"):
                f.write(json.dumps({"input": row["input"], "output": " Paris."}) + "\n")
    run_stage("prep", "task=rlhf", f"out_dir={root / 'prep'}", "template.prompt_template='{input}{output}'",
              f"inputs=[{{path: {root / 'train_in.jsonl'}, split: train}}, "
              f"{{path: {root / 'validation_in.jsonl'}, split: validation}}, "
              f"{{path: {root / 'test_in.jsonl'}, split: test}}]", "seq_length=128", "progress=false")
    return root / "prep"


@pytest.fixture(scope="module")
def learned(lookup_pipeline, paris, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reinforce")
    proc = run_stage("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={paris}", f"run.dir={run_dir}",
                     "reward.kind=rule", *LEARN)
    return run_dir, proc


def test_reinforce_learns_a_rule_reward_and_only_the_adapter_changes(learned):
    run_dir, proc = learned
    train, val = read_metrics(run_dir)
    assert len(train) == 30 and len(val) == 3
    rewards = [r["rewards"] for r in train]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    assert val[-1]["rewards"] > val[0]["rewards"], val
    assert all(0 <= r["fraction_of_samples_properly_ended"] <= 1 and r["init_policy_kl"] >= 0 for r in train)
    assert train[-1]["init_policy_kl"] > 0  # the policy moved away from the SFT model it started as
    m = json.loads((run_dir / "manifest.json").read_text())
    s = m["summary"]
    assert s["frozen_params_unchanged"] and s["trainable_params_changed"]
    assert s["rollouts_per_step"] == 32 and s["reward"] == {"kind": "rule", "metric": "f1"}
    assert s["server"]["stop"]["left"] == [] and s["server"]["ready_s"] < 120
    # every rollout the reward server scored is kept: prompt, response, reward
    rollouts = read_jsonl(run_dir / "rollouts.jsonl")
    assert rollouts and {"step", "prompt", "response", "reward"} <= set(rollouts[0]), rollouts[:1]
    assert {"adapter", "base", "reinforce_png", "rollouts"} <= {r["role"] for r in m["outputs"]}
    assert "merged into" in proc.stdout and "server stopped" in proc.stdout
    assert not leftovers(run_dir)


def test_reinforce_adapter_exports_through_the_export_stage(learned, tmp_path):
    run_dir, _ = learned
    run_stage("export", f"from_run={run_dir}", f"out_dir={tmp_path}")
    m = json.loads((tmp_path / "manifest.json").read_text())
    roles = {r["role"] for r in m["outputs"]}
    assert {"adapter_tp1", "hf_peft"} <= roles, roles
    cfg = json.loads((tmp_path / "hf_peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "q_proj", "v_proj"], cfg




def test_aligners_rlhf_failure_modes_are_refused_up_front(lookup_pipeline, paris, tmp_path):
    def rf(*args):
        return run_stage("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={paris}",
                         f"run.dir={tmp_path / 'run'}", *args, check=False, timeout=120)
    assert_refused(rf("model.micro_batch_size=2"), "model.micro_batch_size: 2", "only broadcasts at 1")
    assert_refused(rf("trainer.reinforce.initial_policy_kl_penalty=0"), "initial_policy_kl_penalty", "1e-6")
    assert_refused(rf("trainer.reinforce.num_rollouts_per_prompt=1"), "RLOO")
    assert_refused(rf("model.global_batch_size=24"), "not a multiple of model.global_batch_size=24")
    assert_refused(rf("trainer.reinforce.trt_llm.enable=true"), "trainer.reinforce.trt_llm.enable", "TensorRT-LLM")
    assert_refused(rf("model.reinforce.num_rollout_samples=512", "model.global_batch_size=32"),
             "fewer than one batch (model.reinforce.num_rollout_samples=512)")
    assert_refused(rf("reward.kind=rm"), "reward.model", "reward.from_run")
    assert_refused(rf("reward.kind=judge"), "reward.kind: 'judge'")
    assert_refused(rf("model.reinforce.length_params.max_length=128"), "max_length")
    sft_rows = lookup_pipeline / "prep"  # SFT rows have no "reference" and no "text"
    assert_refused(run_stage("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={sft_rows}",
                       f"run.dir={tmp_path / 'run'}", check=False, timeout=120), "task=rlhf")
    assert not (tmp_path / "run" / "nemo").exists()


def test_a_reward_server_that_dies_fails_the_run_fast_with_its_log_and_nothing_left(lookup_pipeline, paris, tmp_path):
    """reward.kind=rm with a file that is not a reward model: the server dies while the actor restores;
    the stage names it, shows its log and exits 1 (Aligner's client would wait 6000 s)."""
    t0 = time.monotonic()
    proc = run_stage("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={paris}", f"run.dir={tmp_path}",
                     "reward.kind=rm", f"reward.model={REPO / 'data/tiny/tiny_llama.nemo'}", check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "reward server (reward.kind=rm, 127.0.0.1:" in proc.stderr and "exited with code" in proc.stderr
    assert "server.log" in proc.stderr and "Traceback" not in proc.stderr.split("nemo-ft reinforce:")[-1][:200]
    assert time.monotonic() - t0 < 240
    assert not (tmp_path / "adapter.nemo").exists() and not (tmp_path / "manifest.json").exists()
    assert not leftovers(tmp_path)


def test_nobody_listening_at_a_remote_reward_is_a_bounded_clear_error(lookup_pipeline, paris, tmp_path):
    from nemo_ft.runtime.servers import free_port
    port = free_port()
    proc = run_stage("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={paris}", f"run.dir={tmp_path}",
                     "reward.kind=remote", f"remote_rm.reward_model.port={port}", "reward.ready_timeout_s=5",
                     check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"reward server (reward.kind=remote, 127.0.0.1:{port})" in proc.stderr, proc.stderr[-2000:]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_run_stops_the_actor_and_its_server(lookup_pipeline, paris, tmp_path, sig):
    """SIGTERM (scancel): stop now, exit 143. SIGUSR1 (SLURM's warning before the time limit, passed on by
    slurm/_launch.sh): Aligner's loop checkpoints at the step boundary, exit 75 for a requeue. Either way
    the reward server is stopped and nothing is left running."""
    def scoring():  # rollouts are being scored: the server is up and training has begun
        rollouts = tmp_path / "rollouts.jsonl"
        return rollouts.exists() and rollouts.stat().st_size > 0 and bool(leftovers(tmp_path / "reward_server"))

    code, out, took = signal_mid_run("reinforce", f"from_run={lookup_pipeline / 'sft'}", f"data_dir={paris}",
                                     f"run.dir={tmp_path}", "reward.kind=rule", "trainer.reinforce.max_steps=200",
                                     ready=scoring, sig=sig, log=tmp_path.parent / f"{sig}.log", start_timeout=240)
    if sig == "SIGTERM":
        assert code == 143, out[-3000:]
        assert "stopped by SIGTERM; the reward server was stopped" in out
    else:
        assert code == 75, out[-3000:]
        assert "stopped by SIGUSR1 after step" in out and "rerun the same command to resume" in out
        assert [p for p in (tmp_path / "nemo" / "checkpoints").rglob("*") if "step=" in p.name], "no checkpoint"
    assert took < 90, took
    assert not (tmp_path / "adapter.nemo").exists()
    assert not leftovers(tmp_path)
