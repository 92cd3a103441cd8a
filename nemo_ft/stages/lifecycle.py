"""One lifecycle for every stage that runs NeMo: what each must do, in the order it must be done.

    run = lifecycle.start("sft", cfg, checks=validate_sft, derive=derive)   # 1-6
    model = run.restore(cfg.model.restore_from_path)                        # 7 (syncs NeMo's AppState)
    run.trainer.fit(model)                                                  # the stage's own work
    adapter, _ = run.save_nemo(model, run.dir / "adapter.nemo", check=check_adapter)  # 8
    run.finish(summary, outputs={"adapter": adapter, ...})                  # 9

1. derive: the only place the config is edited (values NeMo insists on but that follow from others);
   afterwards it is read-only, and NeMo gets copies (`run.nemo_cfg()`), never our object;
2. validate: every .nemo the config names is checked before NeMo touches it (nemo_archive: no
   code in pickles, no member outside the archive), then the stage's checks; all problems at once,
   exit 2, nothing started;
3. plan (opt-in): the memory planner's estimate; on a known GPU a layout that cannot fit is refused;
4. run dir: a stale manifest is removed first (a run dir is complete only once `finish` writes one);
   resume bookkeeping: metrics after the checkpoint being resumed are dropped, else metrics start over;
5. runtime.prepare: NeMo's bug fixes, the CPU path, torch.distributed + megatron's groups;
6. NeMo's Megatron trainer + exp_manager (TensorBoard, checkpoints), with our metrics callback;
7. restore/build the model through NeMo, then fill NeMo's AppState (no stage can forget it);
8. save through NeMo into a temp name, check what was written, rename into place;
9. manifest (nemo_ft.artifacts) + loss plot, on rank 0.

Heavy imports stay inside functions so `--help`, `--cfg job` and config errors come back fast.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_ft import artifacts
from nemo_ft.config.entry import StageErrors
from nemo_ft.config.validate import ARCH_KEYS, PROFILE_ONLY_KEYS
from nemo_ft.errors import ConfigError, InputError, NemoFtError
from nemo_ft.stages._metrics import metric_lines, plot_losses

# trainer.<algorithm> sections of NeMo-Aligner's configs (gpt_dpo.yaml, training_rm.yaml, ...).
ALIGNER_TRAINER_KEYS = ("dpo", "rm", "ppo", "reinforce", "sft")
# Versions recorded in every NeMo stage's manifest.
STACK = ("nemo_toolkit", "megatron-core", "torch", "lightning", "nemo-aligner")


def is_rank_zero() -> bool:
    # Before nemo_ft.runtime starts torch.distributed, srun tasks only have SLURM_PROCID.
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def quiet_nemo() -> None:
    """NeMo logs every config and warning at INFO; keep our own summary readable."""
    import logging as pylogging
    import warnings

    from nemo.utils import logging

    logging.setLevel(pylogging.WARNING)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def nemo_model_cfg(cfg: DictConfig, keep_arch: bool = False) -> DictConfig:
    """A mutable copy of cfg as NeMo should see it: without our profile-only keys and, unless a model is
    built from scratch (keep_arch), without the profile's architecture keys. A restored checkpoint's
    own config is the truth for its shapes; the profile's copy is only checked against it
    (run.check_arch) and sized by the planner, never merged over it."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.resolve(cfg)  # as Aligner's scripts do: trainer.max_steps may point into trainer.dpo
    with open_dict(cfg):
        for key in ALIGNER_TRAINER_KEYS:  # Aligner's own loops read these; Lightning's Trainer refuses them
            cfg.trainer.pop(key, None)
        for key in PROFILE_ONLY_KEYS:
            cfg.model.pop(key, None)
        for key in ARCH_KEYS + ("make_vocab_size_divisible_by",):
            if not keep_arch or cfg.model.get(key) is None:
                cfg.model.pop(key, None)
    return cfg


def check_nemo_inputs(cfg: DictConfig, keys: Iterable[str]) -> tuple[list[NemoFtError], set[str]]:
    """Every .nemo named by `keys` opened and checked before NeMo touches it; (errors, bad keys)."""
    from nemo_ft.nemo_archive import check_nemo

    trust = bool(OmegaConf.select(cfg, "run.trust_checkpoint", default=False))
    errors, bad = [], set()
    for key in keys:
        path = OmegaConf.select(cfg, key, default=None)
        if not path or not Path(str(path)).exists():
            continue  # a missing file is the stage checks' message
        try:
            check_nemo(path, key=key, trust=trust)
        except InputError as err:
            errors.append(err)
            bad.add(key)
    return errors, bad


@dataclass
class StageRun:
    """A started stage: its (read-only) config, run directory, runtime and NeMo trainer."""

    stage: str
    cfg: DictConfig
    dir: Path
    rt: object  # nemo_ft.runtime.Runtime
    trainer: object
    resuming: bool
    notes: list = field(default_factory=list)
    planned: Optional[dict] = None  # the planner's bytes (plan=True) ...
    probe: object = None            # ... and a MemoryProbe measuring the same on this rank
    preemption: object = None       # callbacks.Preemption: SIGUSR1/SIGTERM stop Lightning's fit at a step

    def check_preempted(self) -> None:
        """After trainer.fit: a signal stopped it (checkpoint written): Preempted, exit 75, no result saved."""
        if self.preemption is not None and self.preemption.stopped_by:
            from nemo_ft.errors import Preempted
            self.trainer.strategy.barrier()  # every rank's part of the -last checkpoint is written
            raise Preempted(self.preemption.stopped_by, self.preemption.step, str(self.dir / "nemo"))

    @property
    def rank0(self) -> bool:
        return self.rt.rank == 0

    def log(self, message: str) -> None:
        if self.rank0:
            print(f"[nemo-ft {self.stage}] {message}", flush=True)

    @property
    def metrics(self) -> Path:
        return self.dir / self.cfg.run.metrics_file

    def nemo_cfg(self, keep_arch: bool = False) -> DictConfig:
        return nemo_model_cfg(self.cfg, keep_arch)

    def _synced(self, model):
        from nemo_ft import runtime

        runtime.sync_app_state()
        return model

    def build(self, model_cls, model_cfg: DictConfig):
        """A new model from a config (nemo-ft base), through NeMo's constructor."""
        return self._synced(model_cls(model_cfg.model, trainer=self.trainer))

    def restore(self, path, model_cls=None, model_cfg: Optional[DictConfig] = None, connector=None,
                strict: bool = True):
        """NeMo's own restore of a .nemo with our settings merged over its config (merge_cfg_with)."""
        from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

        if model_cls is None:
            from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
            model_cls = MegatronGPTSFTModel
        if model_cfg is None and hasattr(model_cls, "merge_cfg_with"):  # NeMo's PEFT-capable models
            model_cfg = model_cls.merge_cfg_with(str(path), self.nemo_cfg())
        elif model_cfg is None:  # e.g. Aligner's reward model: Aligner's own merge
            from nemo_aligner.utils.utils import load_and_override_model_config
            model_cfg = load_and_override_model_config(str(path), self.nemo_cfg().model)
        with open_dict(model_cfg):
            # The checkpoint's own `target` would make NeMo build that class instead of the one asked for
            # (a base saved by the SFT model restored for DPO stays an SFT model); Aligner drops it too.
            model_cfg.pop("target", None)
            model_cfg.pop("nemo_version", None)
        model = model_cls.restore_from(str(path), model_cfg, trainer=self.trainer, strict=strict,
                                       save_restore_connector=connector or NLPSaveRestoreConnector())
        return self._synced(model)

    def save_nemo(self, model, out, check: Optional[Callable[[Path], dict]] = None) -> tuple[Path, dict]:
        """NeMo's save_to into a temp name next to `out`, `check` it (rank 0), rename into place.
        Returns (path, what check reported). A failed check leaves nothing at `out`. A relative `out` is
        relative to the working directory, as the user typed it (Hydra does not chdir)."""
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        model.save_to(str(tmp))
        report = {}
        if self.rank0:
            try:
                report = check(tmp) if check else {}
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, out)
        return out, report

    def save_adapter(self, model, before: dict) -> tuple[Path, dict, dict]:
        """The trained PEFT weights as run.dir/<run.adapter_name>.nemo, checked (every rank's shard of this
        TP/PP, no empty tensor) before it is put in place; full-parameter runs (peft_scheme none) unchecked.
        `before` is param_digests(model) from before training; returns (path, what the check reported,
        what moved on this rank: the frozen base must come out bit-identical, the trained weights must move)."""
        after = param_digests(model)
        moved = {"frozen_params_unchanged": before["frozen"] == after["frozen"],
                 "trainable_params_changed": before["trainable"] != after["trainable"]}
        tp, pp = self.rt.tp, self.rt.pp
        peft = self.cfg.model.peft.peft_scheme != "none"
        adapter, saved = self.save_nemo(model, self.dir / f"{self.cfg.run.adapter_name}.nemo",
                                        check=(lambda p: check_adapter_file(p, tp, pp)) if peft else None)
        return adapter, saved, moved

    def finish(self, summary: dict, outputs: dict, inputs: Optional[dict] = None, plot_title: Optional[str] = None) -> dict:
        """Rank 0: the loss plot (if titled) and the manifest, last. `outputs`/`inputs` are {role: path}
        (a role may map to a list of paths). Returns the summary."""
        if not self.rank0:
            return summary
        if plot_title:
            outputs = {**outputs, "loss_png": plot_losses(self.metrics, self.dir / "loss.png", plot_title)}
        if self.metrics.exists():
            outputs = {"metrics": self.metrics, **outputs}

        def records(mapping, **kw):
            out = []
            for role, paths in (mapping or {}).items():
                for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                    if p is not None and Path(p).exists():
                        out.append(artifacts.file_record(p, role, **kw))
            return out
        artifacts.write_manifest(self.dir, self.stage, inputs=records(inputs), outputs=records(outputs, relative_to=self.dir),
                                 config=OmegaConf.to_container(self.cfg, resolve=True), summary=summary, dists=STACK)
        return summary


# In run.dir (not in nemo/, which NeMo's exp_manager moves into nemo/run_N/ on a fresh start): the TP/PP
# the run's checkpoints are written at.
LAYOUT_STAMP = "layout.json"


def check_resume_layout(run_dir: Path, layout: dict) -> None:
    """Lightning checkpoints hold optimizer state sharded for the TP/PP that wrote them: resuming them at
    another layout is refused before anything starts (StageErrors, exit 2): at TP=2, a TP=1 run's checkpoint
    hung NeMo's restore for over 5 minutes here."""
    stamp = run_dir / LAYOUT_STAMP
    if not stamp.exists():
        return
    have = json.loads(stamp.read_text())
    if {k: have.get(k, 1) for k in layout} != layout:
        h, w = (f"TP={d['tensor_model_parallel_size']} PP={d['pipeline_model_parallel_size']}" for d in (have, layout))
        raise StageErrors([ConfigError("model.tensor_model_parallel_size",
                                       f"{run_dir / 'nemo' / 'checkpoints'} holds checkpoints written at {h}; this run "
                                       f"asks {w}: resuming optimizer state across layouts is refused. Rerun at {h}, "
                                       "or start a new run.dir from the adapter (`nemo-ft export` writes "
                                       "adapter_tp1.nemo; model.peft.restore_from_path=...)")])


def _complete(ckpt: Path) -> bool:
    """A torch.save .ckpt is a zip archive: a write cut short (a crash, a killed job, a full disk) fails
    its central directory or a member's CRC. Read without unpickling anything."""
    import zipfile

    try:
        with zipfile.ZipFile(ckpt) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def fall_back_from_torn_checkpoint(checkpoints: Path, act: bool) -> list[str]:
    """NeMo resumes from the newest *-last.ckpt (one per TP/PP rank below checkpoints/), and crashes in
    torch.load on a half-written one. If any rank's is torn, it is renamed *.torn and the newest
    checkpoint complete on every rank is copied to a -last name, so NeMo's own resume takes it (and
    metrics.jsonl is trimmed to it); with none complete, StageErrors (exit 2) rather than a silent fresh
    start. Files only: distributed checkpoints (directories) are left to NeMo. Rank 0 acts (`act`),
    before torch.distributed starts, so no rank reads the checkpoints before the fall-back is in place."""
    if not checkpoints.is_dir():
        return []
    lasts = [p for p in checkpoints.rglob("*-last.ckpt") if p.is_file()]
    torn = [p for p in lasts if not _complete(p)]
    if not torn:
        return []
    by_name: dict = {}
    for p in checkpoints.rglob("*.ckpt"):
        if p.is_file() and not p.name.endswith("-last.ckpt"):
            by_name.setdefault(p.name, []).append(p)
    ranks = {p.parent for p in lasts}
    complete = [name for name, files in by_name.items() if {f.parent for f in files} == ranks and all(map(_complete, files))]

    def step(name: str) -> int:
        found = re.search(r"-step=(\d+)", name)
        return int(found.group(1)) if found else -1
    if not complete:
        raise StageErrors([InputError(f"the newest checkpoint is incomplete ({', '.join(str(p) for p in torn)}: a write "
                                      "cut short) and no earlier checkpoint is complete on every rank; move "
                                      f"{checkpoints} aside to start over", path=str(torn[0]), key="exp_manager")])
    best = max(complete, key=step)
    if act:
        for p in lasts:
            p.rename(p.with_name(p.name + ".torn"))
        for f in by_name[best]:
            shutil.copyfile(f, f.with_name(f.name[:-len(".ckpt")] + "-last.ckpt"))
    return [f"the newest checkpoint is incomplete ({torn[0].name}: a write cut short; kept as *.torn): resuming "
            f"from {best} (step {step(best)}), the newest complete on every rank"]


def _has_checkpoint(run_dir: Path) -> bool:
    # PEFT checkpoints are .ckpt files; full fine-tuning's distributed checkpoints are directories.
    ckpt = run_dir / "nemo" / "checkpoints"
    return ckpt.is_dir() and any(p.name.endswith(".ckpt") or p.is_dir() for p in ckpt.iterdir())


def trim_metrics_to_checkpoint(metrics: Path, checkpoints: Path) -> None:
    """On a resume, drop the rows logged after the checkpoint being resumed (exp_manager takes the
    newest *-last.ckpt): a requeued job repeats those steps, and the curve should not jump back."""
    # rglob: at TP or PP > 1 each rank writes its own tp_rank_XX_pp_rank_YYY/*-last.ckpt
    lasts = list(checkpoints.rglob("*-last.ckpt")) if checkpoints.is_dir() else []
    found = re.search(r"-step=(\d+)", max(lasts, key=os.path.getmtime).name) if lasts else None
    if not found or not metrics.exists():
        return
    step = int(found.group(1))
    rows = [line for line in metric_lines(metrics) if json.loads(line)["step"] <= step]
    with artifacts.atomic_write(metrics) as f:
        f.write("".join(line + "\n" for line in rows))


def plan_memory(stage: str, cfg: DictConfig, cuda: bool) -> dict:
    """The planner's per-GPU estimate; on a GPU, refuse a layout that cannot fit (plan.enforce)."""
    from nemo_ft import plan

    pcfg = copy.deepcopy(cfg)  # the planner reads our profile keys too (vocab_size)
    OmegaConf.set_readonly(pcfg, False)
    with open_dict(pcfg):
        pcfg.gpu = cfg.plan.gpu if cfg.plan.gpu else (_detect_gpu() if cuda else None)
    estimate = plan.estimate(pcfg)
    # Enforced wherever the GPU is known: detected on a GPU run, or named with plan.gpu (which also
    # lets a CPU dry run check a cluster layout).
    if cfg.plan.enforce and pcfg.gpu and not estimate.fits:
        _, message = plan.check_fits(pcfg)
        print(message + "\n(override with plan.enforce=false)", file=sys.stderr)
        sys.exit(2)
    return {"trainable_params": estimate.trainable_params, "grad_bytes": estimate.grads,
            "optimizer_bytes": estimate.optimizer, "total_gb": estimate.as_json()["total_gb"], "gpu": pcfg.gpu}


def _detect_gpu() -> Optional[str]:
    """Name of the conf/gpu profile matching the visible GPU, if any."""
    import torch

    name = torch.cuda.get_device_name(0).lower()
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    for key, profile in (("h200", "h200_141gb"), ("h100", "h100_80gb"), ("a100", "a100_80gb" if total_gb > 50 else "a100_40gb"),
                         ("l40s", "l40s_48gb"), ("a10g", "a10g_24gb"), ("4090", "rtx4090_24gb")):
        if key in name:
            return profile
    return None


def start(stage: str, cfg: DictConfig, *, checks: Callable[..., list],
          derive: Optional[Callable[[DictConfig], list]] = None, nemo_inputs: Iterable[str] = (),
          plan: bool = False, fresh_dir: bool = False, aligner: bool = False, rlhf: bool = False) -> StageRun:
    """Steps 1-6 of the module docstring; raises StageErrors (exit 2) before anything is started."""
    try:
        notes = list(derive(cfg) if derive else [])
    except (ConfigError, InputError) as err:  # e.g. an upstream manifest that cannot be read
        raise StageErrors([err]) from None
    OmegaConf.set_readonly(cfg, True)
    errors, bad = check_nemo_inputs(cfg, nemo_inputs)
    errors += list(checks(cfg, skip=bad))
    if errors:
        raise StageErrors(errors)
    if OmegaConf.select(cfg, "run.trust_checkpoint", default=False) and is_rank_zero():
        print(f"[nemo-ft {stage}] run.trust_checkpoint=true: the pickles of {', '.join(nemo_inputs)} are loaded "
              "without checking them", flush=True)

    from nemo_ft import runtime

    planned = None
    if plan:
        try:
            planned = plan_memory(stage, cfg, runtime.wants_cuda(cfg))
        except ConfigError as err:
            raise StageErrors([err]) from None
    run_dir = Path(cfg.run.dir).resolve()
    if fresh_dir and is_rank_zero():  # a scratch dir of the stage's own (e.g. export's temp dir): start empty
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / cfg.run.metrics_file
    resuming = bool(cfg.exp_manager.resume_if_exists) and _has_checkpoint(run_dir)
    layout = {"tensor_model_parallel_size": int(OmegaConf.select(cfg, "model.tensor_model_parallel_size") or 1),
              "pipeline_model_parallel_size": int(OmegaConf.select(cfg, "model.pipeline_model_parallel_size") or 1)}
    if resuming:
        check_resume_layout(run_dir, layout)
        notes += fall_back_from_torn_checkpoint(run_dir / "nemo" / "checkpoints", act=is_rank_zero())
    if is_rank_zero():
        if not resuming and cfg.exp_manager.get("create_checkpoint_callback"):
            with artifacts.atomic_write(run_dir / LAYOUT_STAMP) as f:
                f.write(json.dumps(layout) + "\n")
        (run_dir / artifacts.MANIFEST).unlink(missing_ok=True)
        if resuming:
            trim_metrics_to_checkpoint(metrics, run_dir / "nemo" / "checkpoints")
        else:
            metrics.unlink(missing_ok=True)

    quiet_nemo()
    rt = runtime.prepare(cfg, aligner=aligner or rlhf, rlhf=rlhf)
    for note in notes if rt.rank == 0 else ():
        print(f"[nemo-ft {stage}] note: {note}")
    from nemo_ft.stages import callbacks

    probe = callbacks.MemoryProbe() if plan else None
    preemption = callbacks.Preemption()
    trainer = build_trainer(cfg, run_dir, [preemption] + ([probe] if probe else []))
    return StageRun(stage=stage, cfg=cfg, dir=run_dir, rt=rt, trainer=trainer, resuming=resuming, notes=notes,
                    planned=planned, probe=probe, preemption=preemption)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    """NeMo's own Megatron trainer (strategy, precision plugins) and exp_manager (TensorBoard, checkpoints)."""
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder
    from nemo.utils.exp_manager import exp_manager

    from nemo_ft.stages import callbacks

    nemo = nemo_model_cfg(cfg, keep_arch=True)
    with open_dict(nemo):  # NeMo's trainer builder reads it unguarded; stages that train nothing lack it
        nemo.model.setdefault("gradient_as_bucket_view", False)
    cbs = [callbacks.MetricsRecorder(run_dir / cfg.run.metrics_file, is_rank_zero()), *extra_callbacks]
    if cfg.run.get("stop_after_steps"):
        cbs.append(callbacks.StopAfter(int(cfg.run.stop_after_steps)))
    trainer = MegatronLMPPTrainerBuilder(nemo).create_trainer(callbacks=cbs)
    env = getattr(trainer.strategy, "cluster_environment", None)
    if hasattr(env, "auto_requeue"):
        # Lightning's SLURM auto-requeue would answer SIGUSR1 with its own checkpoint and `scontrol requeue`
        # from inside every task; callbacks.Preemption checkpoints instead and slurm/_launch.sh requeues.
        env.auto_requeue = False
    exp_manager(trainer, nemo.exp_manager)
    return trainer


class EmptyAdapterError(RuntimeError):
    pass


def check_adapter_file(path: Path, tp: int, pp: int) -> dict:
    """Refuse an adapter .nemo NeMo wrote without a rank's weights or with no adapter tensors (its
    silent-empty-save bug); else what it holds."""
    from nemo_ft.nemo_archive import NemoArchive

    with NemoArchive(path) as archive:
        shards = archive.tensors()
    problems = []
    if len(shards) != tp * pp:
        problems.append(f"{len(shards)} weight file(s) for TP={tp} x PP={pp} = {tp * pp} ranks: {sorted(shards)}")
    problems += [f"{name} is empty" for name, sd in shards.items() if not sd]
    if problems:
        raise EmptyAdapterError(f"NeMo wrote an incomplete adapter {path}: " + "; ".join(problems))
    return {"weight_files": sorted(shards), "tensors": sum(len(sd) for sd in shards.values()),
            "params": sum(t.numel() for sd in shards.values() for t in sd.values())}


def param_digests(model) -> dict[str, str]:
    """sha256 over the bytes of the frozen and of the trainable parameters, in name order: the frozen
    base must come out of training bit-identical, the adapter must move."""
    import hashlib

    digests = {"frozen": hashlib.sha256(), "trainable": hashlib.sha256()}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h = digests["trainable" if p.requires_grad else "frozen"]
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {k: h.hexdigest() for k, h in digests.items()}
