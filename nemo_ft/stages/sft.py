"""`nemo-ft sft`: PEFT supervised fine-tuning with NeMo's MegatronGPTSFTModel, config in, adapter out.

Top to bottom, the same steps as NeMo's megatron_gpt_finetuning.py, with the sharp edges filed off:
1. compose conf/sft_lora.yaml, fill what can be derived, validate everything (files, TP/PP vs
   world size and heads, batch sizes, PEFT vs optimizer, the restored checkpoint's architecture):
   one readable message and exit 2 before any model is built;
2. bend NeMo for the CPU if needed and start the parallel groups (nemo_ft.runtime);
3. NeMo's Megatron trainer + exp_manager, MegatronGPTSFTModel.restore_from(base, merged cfg),
   add_adapter(PEFT_CONFIG_MAP[scheme]) (or load_adapters to continue from one), trainer.fit;
4. save the adapter with NeMo's save_to, then open what was written and refuse an empty or
   partial adapter (the silent-empty-save bug), then rename it into place with a manifest.

`run.validate_only=true model.peft.restore_from_path=ADAPTER.nemo` restores base + adapter and
runs NeMo's validation loop only (the round trip check).
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import nemo_ft.config  # noqa: F401  (registers resolvers)
from nemo_ft.config import ConfigError
from nemo_ft.config.validate import fill_defaults, validate_sft
from nemo_ft.data.manifest import sha256_file, write_json
from nemo_ft.paths import CONF_DIR
from nemo_ft.stages import common


class EmptyAdapterError(RuntimeError):
    pass


def adapter_tensors(path: Path) -> dict[str, dict[str, "torch.Tensor"]]:
    """{weights file inside the .nemo: {key: tensor}} for every weights file of an adapter .nemo."""
    import torch

    out = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("model_weights.ckpt"):
                data = tar.extractfile(member).read()
                out[member.name.lstrip("./")] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return out


def check_adapter_file(path: Path, tp: int, pp: int) -> dict:
    """Refuse an adapter .nemo that lacks a rank's weights or holds no adapter tensors."""
    shards = adapter_tensors(path)
    expected = tp * pp
    problems = []
    if len(shards) != expected:
        problems.append(f"{len(shards)} weight file(s) for TP={tp} x PP={pp} = {expected} ranks: {sorted(shards)}")
    for name, sd in shards.items():
        if not sd:
            problems.append(f"{name} is empty")
    if problems:
        raise EmptyAdapterError(f"NeMo wrote an incomplete adapter {path}: " + "; ".join(problems))
    n_params = sum(t.numel() for sd in shards.values() for t in sd.values())
    return {"weight_files": sorted(shards), "tensors": sum(len(sd) for sd in shards.values()), "params": n_params}


def param_digests(model) -> dict[str, str]:
    """sha256 over the bytes of the frozen and of the trainable parameters, in name order."""
    import hashlib

    digests = {"frozen": hashlib.sha256(), "trainable": hashlib.sha256()}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h = digests["trainable" if p.requires_grad else "frozen"]
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {k: h.hexdigest() for k, h in digests.items()}


def _has_checkpoint(run_dir: Path) -> bool:
    # PEFT checkpoints are .ckpt files; full fine-tuning's distributed checkpoints are directories.
    ckpt = run_dir / "nemo" / "checkpoints"
    return ckpt.is_dir() and any(p.name.endswith(".ckpt") or p.is_dir() for p in ckpt.iterdir())


def restore_model(cfg: DictConfig, trainer):
    """NeMo's own restore of the base .nemo with our SFT settings merged over its config."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP

    from nemo_ft import runtime

    nemo_cfg = common.nemo_model_cfg(cfg)
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(cfg.model.restore_from_path, nemo_cfg)
    model = MegatronGPTSFTModel.restore_from(cfg.model.restore_from_path, model_cfg, trainer=trainer,
                                             save_restore_connector=NLPSaveRestoreConnector())
    runtime.sync_app_state()
    peft_cls = PEFT_CONFIG_MAP[cfg.model.peft.peft_scheme]
    if cfg.model.peft.get("restore_from_path"):
        model.load_adapters(str(cfg.model.peft.restore_from_path), peft_cls(model_cfg) if peft_cls else None)
    elif peft_cls is not None:
        model.add_adapter(peft_cls(model_cfg))
    return model


def plan_memory(cfg: DictConfig, cuda: bool) -> dict:
    """The planner's per-GPU estimate; on a GPU, refuse a layout that cannot fit (plan.enforce)."""
    from nemo_ft import plan

    pcfg = cfg.copy()
    with open_dict(pcfg):
        pcfg.gpu = cfg.plan.gpu if cfg.plan.gpu else (detect_gpu() if cuda else None)
    try:
        estimate = plan.estimate(pcfg)
    except ConfigError as err:
        common.fail("sft", [err])
    # Enforced wherever the GPU is known: detected on a GPU run, or named with plan.gpu (which also
    # lets a CPU dry run check a cluster layout).
    if cfg.plan.enforce and pcfg.gpu and not estimate.fits:
        _, message = plan.check_fits(pcfg)
        print(message + "\n(override with plan.enforce=false)", file=sys.stderr)
        sys.exit(2)
    return {"trainable_params": estimate.trainable_params, "grad_bytes": estimate.grads,
            "optimizer_bytes": estimate.optimizer, "total_gb": estimate.as_json()["total_gb"], "gpu": pcfg.gpu}


def detect_gpu() -> str | None:
    """Name of the conf/gpu profile matching the visible GPU, if any."""
    import torch

    name = torch.cuda.get_device_name(0).lower()
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    for key, profile in (("h200", "h200_141gb"), ("h100", "h100_80gb"), ("a100", "a100_80gb" if total_gb > 50 else "a100_40gb"),
                         ("l40s", "l40s_48gb"), ("a10g", "a10g_24gb"), ("4090", "rtx4090_24gb")):
        if key in name:
            return profile
    return None


def run(cfg: DictConfig) -> dict:
    notes = fill_defaults(cfg)
    errors = validate_sft(cfg)
    if errors:
        common.fail("sft", errors)
    from nemo_ft.runtime import wants_cuda

    planned = plan_memory(cfg, wants_cuda(cfg))
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_only = bool(cfg.run.get("validate_only", False))
    resuming = bool(cfg.exp_manager.resume_if_exists) and _has_checkpoint(run_dir) and not validate_only
    metrics = run_dir / cfg.run.metrics_file
    if common.is_rank_zero():
        if resuming:
            common.trim_metrics_to_checkpoint(metrics, run_dir / "nemo" / "checkpoints")
        else:
            metrics.unlink(missing_ok=True)

    from nemo_ft import runtime

    common.quiet_nemo()
    rt = runtime.prepare(cfg)
    for note in notes if rt.rank == 0 else ():
        print(f"[nemo-ft sft] note: {note}")
    if validate_only:
        cfg.exp_manager.create_checkpoint_callback = False
        cfg.exp_manager.resume_if_exists = False
        cfg.exp_manager.explicit_log_dir = str(run_dir / "nemo_validate")
    probe = common.memory_probe_callback()
    trainer = common.build_trainer(cfg, run_dir, extra_callbacks=[probe])
    model = restore_model(cfg, trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if validate_only:
        results = trainer.validate(model)
        val_loss = float(results[0].get("val_loss", results[0].get("validation_loss")))
        if rt.rank == 0:
            print(f"[nemo-ft sft] validation loss of base + {cfg.model.peft.restore_from_path}: {val_loss:.6f}")
        return {"val_loss": val_loss}

    before = param_digests(model)
    trainer.fit(model)
    after = param_digests(model)

    adapter = run_dir / f"{cfg.run.adapter_name}.nemo"
    tmp = run_dir / f".{cfg.run.adapter_name}.nemo.tmp"
    model.save_to(str(tmp))
    summary = {}
    if rt.rank == 0:
        tp, pp = rt.tp, rt.pp
        saved = check_adapter_file(tmp, tp, pp) if cfg.model.peft.peft_scheme != "none" else {}
        os.replace(tmp, adapter)
        train, val = common.read_metrics(metrics)
        summary = {
            "adapter": str(adapter),
            "peft_scheme": cfg.model.peft.peft_scheme,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "trainable_params_per_rank": trainable,
            "saved": saved,
            # Measured on this rank: the frozen base must come out bit-identical, the adapter must move.
            "frozen_params_unchanged": before["frozen"] == after["frozen"],
            "memory_measured": probe.measured,
            "memory_planned": planned,
            "trainable_params_changed": before["trainable"] != after["trainable"],
            "steps": train[-1]["step"] if train else 0,
            "train_loss_first": train[0].get("reduced_train_loss") if train else None,
            "train_loss_last": train[-1].get("reduced_train_loss") if train else None,
            "val_loss_first": val[0]["val_loss"] if val else None,
            "val_loss_last": val[-1]["val_loss"] if val else None,
        }
        common.plot_losses(metrics, run_dir / "loss.png",
                           f"LoRA SFT ({cfg.model.peft.peft_scheme}, TP={tp} PP={pp})")
        write_manifest(run_dir, cfg, adapter, summary)
        print(f"[nemo-ft sft] {summary['steps']} steps; train loss {summary['train_loss_first']:.4f} -> "
              f"{summary['train_loss_last']:.4f}; validation loss "
              + (f"{summary['val_loss_first']:.4f} -> {summary['val_loss_last']:.4f}" if val else "n/a"))
        print(f"[nemo-ft sft] adapter: {adapter} ({saved.get('params', 0)} params in "
              f"{len(saved.get('weight_files', []))} file(s))")
        print(f"[nemo-ft sft] logs + TensorBoard + checkpoints: {run_dir / 'nemo'}; metrics: {metrics}")
    return summary


def write_manifest(run_dir: Path, cfg: DictConfig, adapter: Path, summary: dict) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    files = list(OmegaConf.to_container(cfg.model.data.train_ds.file_names, resolve=True))
    files += list(OmegaConf.to_container(cfg.model.data.validation_ds.file_names, resolve=True))
    outputs = [adapter, run_dir / "loss.png", run_dir / cfg.run.metrics_file]
    manifest = {
        "stage": "sft",
        "inputs": {str(p): sha256_file(str(p)) for p in [cfg.model.restore_from_path, *files]},
        "outputs": {str(p): sha256_file(str(p)) for p in outputs if p.exists()},
        "summary": summary,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {p: installed(p) for p in ("nemo-ft", "nemo_toolkit", "megatron-core", "torch", "lightning")},
    }
    # Through JSON once so DictConfig leftovers (e.g. an inline plan.gpu) serialize as text.
    write_json(str(run_dir / "manifest.json"), json.loads(json.dumps(manifest, default=str)))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sft_lora")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
