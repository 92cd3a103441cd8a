"""What SLURM tells the tasks of an srun step, read without NeMo or torch.

slurm/_launch.sh starts one srun task per device; each task learns from SLURM's variables how many
nodes the step spans and how many tasks run on each (checked against trainer.num_nodes and
trainer.devices before anything starts, nemo_ft.config.validate), and nemo_ft.runtime turns them into
the variables torch.distributed and Lightning read, the same ones torchrun would have set.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

# A job's rendezvous port: 20000 + job id mod 10000, below Linux's ephemeral range (32768-60999) so
# no outgoing connection holds it by chance. slurm/_launch.sh uses the same rule (and checks the port
# is free on the first node); this is the fallback for an srun that did not go through it.
PORT_BASE, PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class StepLayout:
    """An srun step: its node count and the number of tasks on each of its nodes, in node order."""
    nodes: int
    tasks: int
    tasks_per_node: tuple[int, ...]


def expand_tasks_per_node(spec: str) -> tuple[int, ...]:
    """SLURM's compressed per-node task counts, as in SLURM_TASKS_PER_NODE: '2(x3),1' -> (2, 2, 2, 1)."""
    counts: list[int] = []
    for part in spec.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not found:
            raise ValueError(f"not a SLURM tasks-per-node list: {spec!r}")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return tuple(counts)


def srun_step(env: Mapping[str, str] = os.environ) -> Optional[StepLayout]:
    """The layout of the srun step this process is a task of, or None when srun did not start it
    (a batch script's own shell has no SLURM_STEP_ID; under torchrun, WORLD_SIZE is torchrun's)."""
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env or "SLURM_NTASKS" not in env:
        return None
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    per_node = expand_tasks_per_node(spec) if spec else (int(env["SLURM_NTASKS"]),)
    return StepLayout(nodes=int(nodes), tasks=int(env["SLURM_NTASKS"]), tasks_per_node=per_node)


def torch_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's variables for an srun task: WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK, LOCAL_WORLD_SIZE
    ({} when the process was not started by srun, or a launcher already set them)."""
    step = srun_step(env)
    if step is None:
        return {}
    node = int(env.get("SLURM_NODEID", "0"))
    local_world = step.tasks_per_node[node] if node < len(step.tasks_per_node) else step.tasks_per_node[-1]
    return {"WORLD_SIZE": str(step.tasks), "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "NODE_RANK": str(node), "LOCAL_WORLD_SIZE": str(local_world)}


def job_port(job_id: int | str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN
