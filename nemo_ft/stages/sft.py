"""`nemo-ft sft`: PEFT supervised fine-tuning with NeMo's MegatronGPTSFTModel, config in, adapter out.

The same steps as NeMo's megatron_gpt_finetuning.py, on the shared lifecycle (lifecycle.py:
validate everything and exit 2 before any model is built, plan, run dir, runtime, trainer):
restore the base with our settings merged over its config, add_adapter(PEFT_CONFIG_MAP[scheme]) (or
load_adapters to continue from one), trainer.fit, save the adapter with NeMo's save_to and refuse an
empty or partial one (the silent-empty-save bug), then the manifest.

`run.validate_only=true model.peft.restore_from_path=ADAPTER.nemo` restores base + adapter and runs
NeMo's validation loop only (the round trip check).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import fill_defaults, validate_sft
from nemo_ft.stages import lifecycle
from nemo_ft.stages._metrics import read_metrics

NEMO_INPUTS = ("model.restore_from_path", "model.peft.restore_from_path")


def derive(cfg: DictConfig) -> list[str]:
    notes = fill_defaults(cfg)
    if cfg.run.get("validate_only"):  # a validation pass writes no checkpoints and resumes nothing
        cfg.exp_manager.create_checkpoint_callback = False
        cfg.exp_manager.resume_if_exists = False
        cfg.exp_manager.explicit_log_dir = str(Path(cfg.run.dir) / "nemo_validate")
    return notes


def add_peft(run: lifecycle.StageRun, model):
    """NeMo's PEFT_CONFIG_MAP scheme: a fresh adapter, or the one model.peft.restore_from_path names."""
    from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP

    peft_cls = PEFT_CONFIG_MAP[run.cfg.model.peft.peft_scheme]
    if run.cfg.model.peft.get("restore_from_path"):
        model.load_adapters(str(run.cfg.model.peft.restore_from_path), peft_cls(model.cfg) if peft_cls else None)
    elif peft_cls is not None:
        model.add_adapter(peft_cls(model.cfg))
    return model


def run(cfg: DictConfig) -> dict:
    run = lifecycle.start("sft", cfg, checks=validate_sft, derive=derive, nemo_inputs=NEMO_INPUTS, plan=True)
    model = add_peft(run, run.restore(cfg.model.restore_from_path))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if cfg.run.validate_only:
        results = run.trainer.validate(model)
        val_loss = float(results[0].get("val_loss", results[0].get("validation_loss")))
        run.log(f"validation loss of base + {cfg.model.peft.restore_from_path}: {val_loss:.6f}")
        return {"val_loss": val_loss}

    before = lifecycle.param_digests(model)
    run.trainer.fit(model)
    run.check_preempted()
    tp, pp, scheme = run.rt.tp, run.rt.pp, cfg.model.peft.peft_scheme
    adapter, saved, moved = run.save_adapter(model, before)
    if not run.rank0:
        return {}
    train, val = read_metrics(run.metrics)
    summary = {
        "adapter": str(adapter),
        "peft_scheme": scheme,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "trainable_params_per_rank": trainable,
        "saved": saved,
        **moved,  # measured on this rank: frozen base bit-identical, adapter moved
        "memory_measured": run.probe.measured,
        "memory_planned": run.planned,
        "steps": train[-1]["step"] if train else 0,
        "train_loss_first": train[0].get("reduced_train_loss") if train else None,
        "train_loss_last": train[-1].get("reduced_train_loss") if train else None,
        "val_loss_first": val[0]["val_loss"] if val else None,
        "val_loss_last": val[-1]["val_loss"] if val else None,
    }
    data = {split: list(OmegaConf.to_container(cfg.model.data[f"{split}_ds"].file_names, resolve=True))
            for split in ("train", "validation")}
    run.finish(summary, outputs={"adapter": adapter},
               inputs={"base": cfg.model.restore_from_path, "adapter": cfg.model.peft.get("restore_from_path"), **data},
               plot_title=f"LoRA SFT ({scheme}, TP={tp} PP={pp})")
    run.log(f"{summary['steps']} steps; train loss {summary['train_loss_first']:.4f} -> "
            f"{summary['train_loss_last']:.4f}; validation loss "
            + (f"{summary['val_loss_first']:.4f} -> {summary['val_loss_last']:.4f}" if val else "n/a"))
    run.log(f"adapter: {adapter} ({saved.get('params', 0)} params in {len(saved.get('weight_files', []))} file(s))")
    if summary["steps"] and not moved["trainable_params_changed"]:
        run.log(f"warning: the trainable weights did not change in {summary['steps']} steps (grad norm "
                f"{train[-1].get('grad_norm')}): {adapter} is its starting point, not a trained adapter")
    run.log(f"logs + TensorBoard + checkpoints: {run.dir / 'nemo'}; metrics: {run.metrics}")
    return summary


@stage_main("sft", "sft_lora")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
