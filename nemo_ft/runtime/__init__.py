"""The only place where nemo-ft bends NeMo: bug fixes, the CPU path, and distributed start-up.

`prepare(cfg)` is called by every NeMo stage before anything is built:
1. apply the NeMo/megatron-core bug fixes (GPU and CPU alike, each only where the bug is present);
2. on a CPU run, apply the CPU patches (see patches.py; facts in ../shared/NEMO_CPU.md);
3. start torch.distributed and megatron-core's model-parallel groups *before* NeMo builds the
   model: megatron-core 0.13 reads the groups while constructing attention, but NeMo only creates
   them later, inside the trainer. NeMo then skips its own group setup, so we fill its AppState.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from omegaconf import OmegaConf

from nemo_ft import slurm
from nemo_ft.runtime import patches


@dataclass
class Runtime:
    cuda: bool
    rank: int
    local_rank: int
    world_size: int
    tp: int
    pp: int
    backend: str


def wants_cuda(cfg) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch
        return torch.cuda.is_available()
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def init_distributed(tp: int, pp: int, cuda: bool) -> Runtime:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    # srun started one task per device: SLURM's variables as torchrun would have set them
    # (WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK, LOCAL_WORLD_SIZE; nothing under torchrun).
    os.environ.update(slurm.torch_env())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if "SLURM_JOB_ID" in os.environ and world > 1:
            # Every srun task must agree on the rendezvous without talking first.
            os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
            os.environ.setdefault("MASTER_PORT", str(slurm.job_port(os.environ["SLURM_JOB_ID"])))
        # A single process gets a loopback rendezvous of its own; Lightning reuses the group.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Runtime(cuda=cuda, rank=rank, local_rank=local_rank, world_size=world, tp=tp, pp=pp, backend=backend)


def sync_app_state() -> None:
    """Fill the AppState fields NeMo would have set in its own group setup (which we pre-empted).

    Without them a TP=2 adapter save writes no file and the restore fails (NEMO_CPU.md).
    """
    from megatron.core import parallel_state
    from nemo.utils import AppState

    app = AppState()
    app.tensor_model_parallel_group = parallel_state.get_tensor_model_parallel_group()
    app.pipeline_model_parallel_group = parallel_state.get_pipeline_model_parallel_group()
    app.data_parallel_group = parallel_state.get_data_parallel_group()
    app.data_parallel_rank = parallel_state.get_data_parallel_rank()
    app.data_parallel_size = parallel_state.get_data_parallel_world_size()
    app.tensor_model_parallel_rank = parallel_state.get_tensor_model_parallel_rank()
    app.pipeline_model_parallel_rank = parallel_state.get_pipeline_model_parallel_rank()
    app.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    app.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    app.model_parallel_size = app.tensor_model_parallel_size * app.pipeline_model_parallel_size


def prepare(cfg, aligner: bool = False, rlhf: bool = False) -> Runtime:
    cuda = wants_cuda(cfg)
    if cuda:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator asks for a GPU but torch sees no CUDA device; "
                               "use parallel=cpu for a CPU run")
    os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")  # read at import time by nemo.lightning too
    patches.apply(patches.NEMO_FIXES)
    if not cuda:
        patches.apply(patches.CPU_PATCHES)
    if OmegaConf.select(cfg, "run.loss_per_token", default=False):  # sft: one loss for any DP/accumulation
        patches.apply(patches.TOKEN_MEAN_LOSS)
    if aligner:  # the preference stages: NeMo-Aligner on top of the same NeMo
        patches.apply(patches.ALIGNER_FIXES)
        if not cuda:
            patches.apply(patches.ALIGNER_CPU_PATCHES)
    if rlhf:  # REINFORCE/PPO actors and their servers (stubs first: the patch targets import the actor)
        patches.install_stubs(patches.RLHF_STUBS)
        patches.apply(patches.RLHF_FIXES)
        if not cuda:
            patches.apply(patches.RLHF_CPU_PATCHES)
    return init_distributed(int(cfg.model.get("tensor_model_parallel_size", 1)),
                            int(cfg.model.get("pipeline_model_parallel_size", 1)), cuda)
