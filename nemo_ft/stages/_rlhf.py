"""What the RLHF stages (reinforce, ppo) share: the servers they start and stop, and the checks of the
rollout arithmetic NeMo-Aligner asserts (or divides by) only once generation has begun.

Servers: Aligner's actor reaches its reward model (and PPO's critic) over PyTriton and never checks that
anything is listening: its client waits 6000 s, then 600000 s per request. Here the stage starts each
server as a child process of rank 0 (`nemo-ft reward_server` on 127.0.0.1), polls its readiness URLs
with a deadline, and on failure names the server and shows its log; the server is stopped on every
exit path (success, error, SIGTERM/SIGINT), its whole process group, with nothing left behind.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from nemo_ft import artifacts
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.stages import _aligner as aligner

REWARD_KINDS = ("rule", "rm", "remote")
# torch.distributed / SLURM task variables of the actor: a server started here is a world of its own.
_WORLD_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE",
               "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID")


class ServerError(RuntimeError):
    """A server did not come up, or died: the message names it and ends with its log's tail."""


def derive_reward(cfg: DictConfig) -> list[str]:
    if cfg.reward.kind == "rm" and cfg.reward.from_run and not cfg.reward.model:
        m = artifacts.read_manifest(cfg.reward.from_run, stage="rm", key="reward.from_run")
        cfg.reward.model = str(m.output("reward_model"))
    return []


def check_reward(cfg: DictConfig, need_model: bool = True) -> list:
    """need_model=False: the reward model is served by a server started elsewhere (PPO, critic.remote)."""
    r, errors = cfg.reward, []
    if r.kind not in REWARD_KINDS:
        return [ConfigError("reward.kind", f"{r.kind!r}: expected one of {REWARD_KINDS}")]
    if r.kind == "rm" and need_model:
        if not r.model:
            errors.append(ConfigError("reward.model", "reward.kind=rm needs a reward model: reward.model=<rm.nemo> "
                                                      "or reward.from_run=<a nemo-ft rm run dir>"))
        elif not Path(r.model).exists():
            errors.append(ConfigError("reward.model", f"file not found: {r.model}"))
    if r.kind == "rule":
        if r.metric not in ("f1", "exact"):
            errors.append(ConfigError("reward.metric", f"{r.metric!r}: expected f1 or exact"))
        for role in ("train", "validation"):
            path = aligner.split_file(cfg, role)
            if path and Path(path).exists():
                data = aligner.rows(path)
                if data and "reference" not in data[0]:
                    errors.append(InputError('reward.kind=rule scores against each prompt\'s "reference": these '
                                             "rows have none (prep task=rlhf writes it)", path=path,
                                             key=f"model.data.data_prefix.{role}"))
    if r.port is not None and (not isinstance(r.port, int) or not 0 < r.port < 65536):
        errors.append(ConfigError("reward.port", f"{r.port!r}: expected a TCP port or null"))
    for key in ("ready_timeout_s", "client_init_timeout_s", "client_inference_timeout_s", "stop_timeout_s"):
        if not isinstance(r.get(key), (int, float)) or r.get(key) <= 0:
            errors.append(ConfigError(f"reward.{key}", f"{r.get(key)!r}: expected a positive number of seconds"))
    return errors


def check_trt_llm(cfg: DictConfig, section: str) -> list:
    import importlib.util

    if OmegaConf.select(cfg, f"trainer.{section}.trt_llm.enable") and importlib.util.find_spec("tensorrt_llm") is None:
        return [ConfigError(f"trainer.{section}.trt_llm.enable", "needs TensorRT-LLM (NeMo-Aligner's NGC container), "
                                                                 "which is not installed: set it false (NeMo's own "
                                                                 "generate)")]
    return []


def check_prompts(cfg: DictConfig, base_ok: bool, max_length: int) -> list:
    """Prompts Aligner's RLHFDataset would skip silently (over seq_length // 2 tokens) or that leave no room
    for max_length generated tokens, counted with the base's tokenizer."""
    seq = int(cfg.model.data.seq_length)
    errors = []
    if max_length >= seq:
        return [ConfigError("model.<algorithm>.length_params.max_length", f"{max_length} >= seq_length {seq}")]
    if not base_ok:
        return errors
    with aligner.nemo_tokenizer(OmegaConf.select(cfg, "pretrained_checkpoint.restore_from_path"),
                                "pretrained_checkpoint.restore_from_path") as tok:
        for role in ("train", "validation") if tok else ():
            path = aligner.split_file(cfg, role)
            if not (path and Path(path).exists()):
                continue
            lengths = [len(tok.encode(r["text"])) for r in aligner.rows(path)]
            skipped = [i + 1 for i, n in enumerate(lengths) if n > seq // 2]
            tight = [i + 1 for i, n in enumerate(lengths) if n + max_length > seq]
            if skipped:
                errors.append(InputError(f"{len(skipped)} prompt(s) longer than seq_length // 2 = {seq // 2} tokens "
                                         f"(lines {skipped[:5]}): Aligner's RLHF dataset would skip them silently; "
                                         "re-run prep task=rlhf with this seq_length", path=path,
                                         key=f"model.data.data_prefix.{role}"))
            elif tight:
                errors.append(InputError(f"{len(tight)} prompt(s) leave fewer than max_length={max_length} tokens "
                                         f"of the {seq}-token context (lines {tight[:5]})", path=path,
                                         key=f"model.data.data_prefix.{role}"))
    return errors


def reward_argv(cfg: DictConfig, port: int, run_dir: Path) -> list[str]:
    """`nemo-ft reward_server` for this stage's reward, one process on 127.0.0.1, this run's accelerator."""
    r = cfg.reward
    argv = [sys.executable, "-m", "nemo_ft.stages.reward_server", f"kind={r.kind}", "host=127.0.0.1",
            f"port={port}", f"model_name={cfg.remote_rm.reward_model.name}", f"run.dir={run_dir}",
            f"trainer.accelerator={cfg.trainer.accelerator}", f"trainer.precision={cfg.trainer.precision}",
            "trainer.devices=1", "trainer.num_nodes=1"]
    if r.kind == "rm":
        argv += [f"rm_model_file={r.model}"]
    else:
        files = [p for role in aligner.SPLIT_ROLES for p in [aligner.split_file(cfg, role)] if p]
        argv += [f"rule.metric={r.metric}", f"rule.files=[{','.join(dict.fromkeys(files))}]",
                 f"rule.tokenizer_from={cfg.pretrained_checkpoint.restore_from_path}"]
    return argv


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_VARS}
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", PYTHONUNBUFFERED="1")
    return env


@dataclass
class RewardService:
    """The reward server of one RLHF run: started by rank 0 (unless remote), shared address on every rank."""

    cfg: DictConfig
    run_dir: Path
    rank0: bool
    ip: str = "127.0.0.1"
    port: int = 0
    server: object = None  # a runtime.servers.ChildServer on rank 0
    log: Optional[Path] = None
    timings: dict = field(default_factory=dict)

    server_dir = "reward_server"  # below run.dir: the server's log and run dir

    @property
    def name(self) -> str:
        return f"reward server (reward.kind={self.cfg.reward.kind}, {self.ip}:{self.port})"

    @property
    def remote(self) -> bool:
        return self.cfg.reward.kind == "remote"

    def remote_address(self) -> tuple[str, int]:
        return str(self.cfg.remote_rm.reward_model.ip), int(self.cfg.remote_rm.reward_model.port)

    def argv(self, port: int, run_dir: Path) -> list[str]:
        return reward_argv(self.cfg, port, run_dir)

    def models(self) -> list[str]:
        return [self.cfg.remote_rm.reward_model.name]

    def start(self) -> "RewardService":
        """Rank 0 picks the port and starts the server; every rank learns the address."""
        import time

        import torch.distributed as dist

        from nemo_ft.runtime import servers

        r = self.cfg.reward
        if self.remote:
            self.ip, self.port = self.remote_address()
            return self
        port = [int(r.port or servers.free_port()) if self.rank0 else 0]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(port, src=0)
        self.port = port[0]
        if self.rank0:
            if servers.port_in_use(self.port):
                raise ServerError(f"{self.name}: port {self.port} is already in use on 127.0.0.1")
            self.log = self.run_dir / self.server_dir / "server.log"
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log.unlink(missing_ok=True)
            self.timings["started"] = time.monotonic()
            self.server = servers.ChildServer.start(self.server_dir, self.argv(self.port, self.log.parent),
                                                    child_env(), self.log)
        return self

    def wait_ready(self) -> float:
        """Rank 0: the server's readiness URLs answer 200 within reward.ready_timeout_s, or ServerError."""
        import time

        from nemo_ft.runtime import servers

        if not self.rank0:
            return 0.0
        urls = servers.triton_ready_urls(self.port, self.models())
        if self.remote:
            urls = [u.replace(f"{servers.LOOPBACK}:", f"{self.ip}:") for u in urls]
            died = (lambda: None)
        else:
            died = self.server.died
        try:
            servers.wait_ready(urls, float(self.cfg.reward.ready_timeout_s) - self._elapsed(), died,
                               self.log or Path("(remote: no log here)"))
        except servers.ServerFailed as err:
            raise ServerError(f"{self.name}: {err}") from None
        self.timings["ready_s"] = round(time.monotonic() - self.timings.get("started", time.monotonic()), 2)
        return self.timings["ready_s"]

    def _elapsed(self) -> float:
        import time
        return time.monotonic() - self.timings["started"] if "started" in self.timings else 0.0

    def check_alive(self) -> None:
        if self.server is not None and self.server.died():
            from nemo_ft.runtime import servers
            raise ServerError(f"{self.name} {self.server.died()}; the last lines of {self.log}:\n"
                              f"{servers.log_tail(self.log)}")

    def stop(self) -> dict:
        from nemo_ft.runtime import servers

        if self.server is None:
            return {}
        with servers.signals_ignored():
            self.timings["stop"] = self.server.stop(float(self.cfg.reward.stop_timeout_s))
        self.server = None
        return self.timings["stop"]

    def client_cfg(self) -> DictConfig:
        """Aligner's remote_rm section, pointing at this server."""
        rm = OmegaConf.create(OmegaConf.to_container(self.cfg.remote_rm, resolve=True))
        rm.reward_model.ip, rm.reward_model.port = self.ip, self.port
        return rm


@dataclass
class CriticService(RewardService):
    """PPO's critic server (`nemo-ft critic_server`), which also serves the reward model's rewards when
    combined (Aligner's default and the path this stage runs: trainer.ppo.combine_rm_and_critic_server)."""
    server_dir = "critic_server"

    @property
    def name(self) -> str:
        return f"critic server (critic + reward model, {self.ip}:{self.port})"

    @property
    def remote(self) -> bool:
        return bool(self.cfg.critic.remote)

    def remote_address(self) -> tuple[str, int]:
        return str(self.cfg.remote_critic_rm.critic.ip), int(self.cfg.remote_critic_rm.critic.port)

    def argv(self, port: int, run_dir: Path) -> list[str]:
        c = self.cfg.critic
        return [sys.executable, "-m", "nemo_ft.stages.critic_server", "host=127.0.0.1", f"trainer.ppo.port={port}",
                f"pretrained_checkpoint.restore_from_path={self.cfg.reward.model}", f"run.dir={run_dir}",
                f"trainer.accelerator={self.cfg.trainer.accelerator}", f"trainer.precision={self.cfg.trainer.precision}",
                "trainer.devices=1", "trainer.num_nodes=1", f"model.global_batch_size={c.global_batch_size}",
                f"model.optim.lr={c.lr}", f"model.seed={self.cfg.model.seed}", *c.overrides]

    def models(self) -> list[str]:
        return list(OmegaConf.to_container(self.cfg.remote_critic_rm.critic.name, resolve=True).values())

    def client_cfg(self) -> DictConfig:
        """Aligner's remote_critic_rm section, pointing at this server."""
        rc = OmegaConf.create(OmegaConf.to_container(self.cfg.remote_critic_rm, resolve=True))
        rc.critic.ip, rc.critic.port = self.ip, self.port
        return rc
