"""What an srun task reads from SLURM (nemo_ft.slurm), the node/task checks made from it before anything
starts (nemo_ft.config.validate.check_parallel), and resume bookkeeping at TP/PP > 1. Env vars only."""
import json

import pytest
from omegaconf import OmegaConf

from nemo_ft import slurm
from nemo_ft.config.validate import check_parallel
from nemo_ft.stages.lifecycle import trim_metrics_to_checkpoint

SLURM_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_STEP_NUM_NODES", "SLURM_TASKS_PER_NODE",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def step(nodes, per_node, procid=0, nodeid=0, localid=0) -> dict:
    """The variables srun gives a task of a step over `nodes` nodes with `per_node` tasks on each."""
    return {"SLURM_STEP_ID": "0", "SLURM_NTASKS": str(sum(slurm.expand_tasks_per_node(per_node))),
            "SLURM_PROCID": str(procid), "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid),
            "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_TASKS_PER_NODE": per_node, "SLURM_STEP_TASKS_PER_NODE": per_node}


@pytest.fixture
def under(monkeypatch):
    def set_env(env: dict):
        for key in SLURM_KEYS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    set_env({})
    return set_env


def errors(devices, nodes, pp=1):
    cfg = OmegaConf.create({"trainer": {"devices": devices, "num_nodes": nodes},
                            "model": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": pp,
                                      "num_layers": 2, "micro_batch_size": 1, "global_batch_size": 8}})
    return [(e.key, e.message) for e in check_parallel(cfg)]


@pytest.mark.parametrize("spec, counts", [("1", (1,)), ("2(x3)", (2, 2, 2)), ("2(x3),1", (2, 2, 2, 1)),
                                          ("8,4(x2)", (8, 4, 4))])
def test_tasks_per_node_lists_expand(spec, counts):
    assert slurm.expand_tasks_per_node(spec) == counts


def test_a_tasks_per_node_list_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="not a SLURM tasks-per-node list"):
        slurm.expand_tasks_per_node("2(x)")


def test_torch_env_of_the_second_node_rank(under):
    under(step(2, "4(x2)", procid=5, nodeid=1, localid=1))
    assert slurm.torch_env() == {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "NODE_RANK": "1",
                                 "LOCAL_WORLD_SIZE": "4"}


def test_no_srun_no_translation(under):
    under({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_NNODES": "1"})  # the batch shell itself
    assert slurm.srun_step() is None and slurm.torch_env() == {}
    under({**step(1, "2"), "WORLD_SIZE": "2"})  # torchrun inside a job: its variables win
    assert slurm.srun_step() is None and slurm.torch_env() == {}


def test_job_port_stays_below_the_ephemeral_range():
    assert slurm.job_port(7) == 20007 and slurm.job_port(123456) == 23456
    assert all(20000 <= slurm.job_port(j) < 30000 for j in range(0, 100000, 997))


def test_matching_two_node_layout_passes(under):
    under(step(2, "1(x2)", procid=1, nodeid=1))
    assert errors(devices=1, nodes=2, pp=2) == []


def test_num_nodes_must_match_the_step_nodes(under):
    under(step(2, "1(x2)"))  # sbatch --nodes=2 --ntasks-per-node=1, profile: 2 devices on 1 node
    found = errors(devices=2, nodes=1)
    assert [k for k, _ in found] == ["trainer.num_nodes", "trainer.devices"]
    assert found[0][1].startswith("SLURM started this job step on 2 node(s) but trainer.num_nodes = 1;")
    assert "SLURM placed 1,1 task(s) on its 2 node(s) but trainer.devices = 2" in found[1][1]


def test_uneven_placement_with_the_right_total_is_refused(under):
    under(step(2, "3,1"))  # 4 tasks for 2 nodes x 2 devices, but 3 + 1
    assert errors(devices=2, nodes=2) == [
        ("trainer.devices", "SLURM placed 3,1 task(s) on its 2 node(s) but trainer.devices = 2 (one task per device "
                            "on every node); sbatch --ntasks-per-node 2")]


def test_wrong_total_is_one_error_not_two(under):
    under(step(1, "1"))  # the existing one-node case: --ntasks=1 for parallel=cpu_tp2
    assert [k for k, _ in errors(devices=2, nodes=1)] == ["trainer.devices"]
    under(step(1, "1"))  # a 2-node profile on a 1-node job: the total and the node count
    assert [k for k, _ in errors(devices=1, nodes=2, pp=2)] == ["trainer.devices", "trainer.num_nodes"]


def test_resume_trims_metrics_to_the_checkpoint_of_any_layout(tmp_path):
    """At TP or PP > 1 NeMo writes checkpoints/tp_rank_XX_pp_rank_YYY/*-last.ckpt, one per rank."""
    ckpts = tmp_path / "checkpoints"
    for rank in ("tp_rank_00_pp_rank_000", "tp_rank_00_pp_rank_001"):
        (ckpts / rank).mkdir(parents=True)
        (ckpts / rank / "m--validation_loss=1.910-step=40-consumed_samples=320.0-last.ckpt").write_text("")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 53)))
    trim_metrics_to_checkpoint(metrics, ckpts)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 41))



def test_a_torn_last_metrics_line_from_a_killed_run_is_dropped_on_resume(tmp_path):
    """kill -9 mid-append leaves half a JSON line: the resume keeps the complete rows up to the checkpoint."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "m--step=3-consumed_samples=24.0-last.ckpt").write_text("")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 6)) + '{"kind": "tr')
    trim_metrics_to_checkpoint(metrics, ckpts)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text('{"kind": "tr\n' + json.dumps({"kind": "train", "step": 1}) + "\n")
    with pytest.raises(json.JSONDecodeError):  # only the last line may be torn
        trim_metrics_to_checkpoint(metrics, ckpts)


def test_a_torn_last_checkpoint_falls_back_per_rank_or_refuses(tmp_path):
    import zipfile

    from nemo_ft.config.entry import StageErrors
    from nemo_ft.stages.lifecycle import fall_back_from_torn_checkpoint

    def ckpt(path, torn=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"x" * 1000)
        if torn:
            path.write_bytes(path.read_bytes()[:500])

    root = tmp_path / "checkpoints"
    for rank in ("tp_rank_00_pp_rank_000", "tp_rank_01_pp_rank_000"):
        ckpt(root / rank / "m--val=1.0-step=20-last.ckpt", torn=rank.startswith("tp_rank_01"))
        ckpt(root / rank / "m--val=1.2-step=10.ckpt")
    ckpt(root / "tp_rank_00_pp_rank_000" / "m--val=1.1-step=15.ckpt")  # on one rank only: not complete
    assert fall_back_from_torn_checkpoint(root, act=False)[0].endswith("(step 10), the newest complete on every rank")
    assert len(list(root.rglob("*-last.ckpt"))) == 2 and not list(root.rglob("*.torn"))  # act=False: no change
    fall_back_from_torn_checkpoint(root, act=True)
    assert sorted(p.name for p in root.rglob("*-last.ckpt")) == ["m--val=1.2-step=10-last.ckpt"] * 2
    assert len(list(root.rglob("*.torn"))) == 2
    assert fall_back_from_torn_checkpoint(root, act=True) == []  # nothing torn now
    for p in root.rglob("*step=10*"):
        p.write_bytes(b"not a zip")
    ckpt(root / "tp_rank_00_pp_rank_000" / "m--step=40-last.ckpt", torn=True)
    with pytest.raises(StageErrors) as err:
        fall_back_from_torn_checkpoint(root, act=True)
    assert "no earlier checkpoint is complete on every rank" in str(err.value.errors[0])
