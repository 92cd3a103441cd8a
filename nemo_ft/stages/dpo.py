"""`nemo-ft dpo`: DPO (and IPO, RPO) with a LoRA policy, through NeMo-Aligner 0.7.0's own classes.

    nemo-ft dpo from_run=runs/demo/sft data_dir=runs/demo/prep_dpo

The same steps as Aligner's train_gpt_dpo.py (MegatronGPTDPOModel + DPOTrainer, its dataset builders
and checkpointing), on the shared lifecycle, with Aligner's sharp edges turned into up-front errors:
fewer pairs than one global batch, pairs longer than seq_length (Aligner keeps them with zero loss),
distributed_fused_adam with LoRA, data prepared for another tokenizer or task, an EOS setting the
data was not prepared with. Aligner's reference policy is the policy with its adapters off, so an SFT
adapter is merged into the base first (export's merge, in fp32) when DPO starts from one: the
reference is then the SFT model, as DPO assumes. metrics.jsonl gets loss, rewards chosen/rejected,
their margin and accuracy (train and validation); dpo.png plots them.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_aligner_loop, check_parallel, check_peft, check_restore, check_stack
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.stages import _aligner as aligner, lifecycle
from nemo_ft.stages._metrics import read_metrics

BASE_KEY = "pretrained_checkpoint.restore_from_path"
NEMO_INPUTS = (BASE_KEY, "sft_adapter", "model.peft.restore_from_path")


def derive(cfg: DictConfig) -> list[str]:
    notes = aligner.from_sft_run(cfg, "DPO")
    if cfg.data_dir:
        cfg.model.data.data_prefix = aligner.data_prefix_from(cfg.data_dir)
    return notes


def over_length_pairs(cfg) -> dict:
    """{split: line numbers of pairs longer than model.data.seq_length}, measured the way Aligner's
    DPOModelDataset measures them, with the base's own tokenizer."""
    from nemo_ft.data.tokenize import dpo_pair_length

    seq, eod, out = int(cfg.model.data.seq_length), bool(cfg.model.data.append_eod), {}
    with aligner.nemo_tokenizer(OmegaConf.select(cfg, BASE_KEY), BASE_KEY) as tok:
        for role in ("train", "validation") if tok else ():
            path = aligner.split_file(cfg, role)
            if path and Path(path).exists():
                rows = aligner.rows(path)
                out[role] = [i + 1 for i, r in enumerate(rows) if "chosen_response" in r
                             and dpo_pair_length(tok, r, eod) > seq]
    return out


def check_data(cfg: DictConfig, base_ok: bool) -> list:
    """Aligner's DPO dataset, asked the questions it answers only at train time (or never)."""
    errors = []
    if cfg.model.data.over_length not in ("reject", "keep"):
        errors.append(ConfigError("model.data.over_length", f"{cfg.model.data.over_length!r}: expected reject or keep"))
    base_tok = aligner.base_tokenizer_sha(OmegaConf.select(cfg, BASE_KEY)) if base_ok else None
    errors += aligner.check_splits(cfg, task="dpo", units=len, unit="pair",
                                   row_keys=("prompt", "chosen_response", "rejected_response"),
                                   append_eod=bool(cfg.model.data.append_eod), append_eod_key="model.data.append_eod",
                                   prep_eod_key="dpo.append_eod", base_tok=base_tok)
    if base_ok and cfg.model.data.over_length == "reject" and not errors:
        for role, lines in over_length_pairs(cfg).items():
            if lines:
                path = aligner.split_file(cfg, role)
                errors.append(InputError(f"{len(lines)} of {len(aligner.rows(path))} pairs are longer than "
                                         f"model.data.seq_length={cfg.model.data.seq_length} (lines {lines[:5]}): "
                                         "Aligner would train on them with zero loss, silently. Re-prep with that "
                                         "seq_length, or set model.data.over_length=keep", path=path,
                                         key=f"model.data.data_prefix.{role}"))
    return errors


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    restore = list(check_restore(cfg, key=BASE_KEY)) if BASE_KEY not in skip else []
    errors = list(restore)
    errors += list(check_parallel(cfg)) + list(check_peft(cfg)) + list(check_stack(cfg)) + list(check_aligner_loop(cfg, "dpo"))
    if cfg.model.peft.peft_scheme not in ("lora", "none"):
        errors.append(ConfigError("model.peft.peft_scheme", "Aligner's DPO supports lora or none (full fine-tuning)"))
    base = OmegaConf.select(cfg, BASE_KEY)
    base_ok = bool(base) and Path(base).exists() and BASE_KEY not in skip and not restore
    errors += aligner.check_sft_adapter(cfg, base_ok, skip)
    errors += check_data(cfg, base_ok)
    return errors


def run(cfg: DictConfig) -> dict:
    from nemo_aligner.algorithms.dpo import DPOTrainer, dpo_custom_collate
    from nemo_aligner.data.nlp.builders import build_train_valid_test_dpo_datasets, identity_collate
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_aligner.utils.train_script_utils import init_peft

    run = lifecycle.start("dpo", cfg, checks=checks, derive=derive, nemo_inputs=NEMO_INPUTS, aligner=True)
    base = Path(cfg.pretrained_checkpoint.restore_from_path)
    if cfg.sft_adapter:
        base = aligner.merge_sft(run, cfg)
    model = run.restore(base, model_cls=MegatronGPTDPOModel)
    init_peft(model, model.cfg)
    before = lifecycle.param_digests(model)
    loop = aligner.setup_loop(run, model, build_train_valid_test_dpo_datasets, collate_fn=identity_collate)
    trainer = DPOTrainer(
        cfg=cfg.trainer.dpo, model=model, optimizer=loop.optimizer, scheduler=loop.scheduler,
        train_dataloader=loop.train_dl, val_dataloader=loop.val_dl, test_dataloader=None,
        collate_fn=partial(dpo_custom_collate, eos_id=model.tokenizer.eos_id,
                           reset_position_ids=cfg.model.data.reset_position_ids,
                           reset_attention_mask=cfg.model.data.reset_attention_mask,
                           eod_mask_loss=cfg.model.data.eod_mask_loss),
        logger=loop.logger, ckpt_callback=loop.ckpt_callback, run_timer=loop.run_timer,
        pad_length_to_multiple_of=cfg.model.data.pad_length_to_multiple_of)
    if loop.state is not None:
        trainer.load_state_dict(loop.state)
    trainer.fit()
    aligner.check_preempted(run, loop.run_timer, trainer.step)
    tp, pp = run.rt.tp, run.rt.pp
    adapter, saved, moved = run.save_adapter(model, before)
    if not run.rank0:
        return {}
    train, val = read_metrics(run.metrics)
    over = {r: len(lines) for r, lines in over_length_pairs(cfg).items()} if cfg.model.data.over_length == "keep" else {}
    summary = {
        "adapter": str(adapter), "peft_scheme": cfg.model.peft.peft_scheme, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp, "saved": saved, "preference_loss": cfg.model.dpo.preference_loss,
        "beta": cfg.model.dpo.ref_policy_kl_penalty, "reference": "the SFT-merged base" if cfg.sft_adapter else
        "the base (adapters off)", **moved, "steps": len(train),
        "step0": {k: train[0].get(k) for k in ("loss", "rewards_chosen_mean", "rewards_rejected_mean", "acc")} if train else None,
        "last": train[-1] if train else None, "val_last": val[-1] if val else None, "pairs_over_seq_length_kept": over,
    }
    png = plot_preference(run.metrics, run.dir / "dpo.png", f"DPO ({cfg.model.dpo.preference_loss}, beta "
                                                           f"{cfg.model.dpo.ref_policy_kl_penalty}), TP={tp} PP={pp}")
    outputs = {"adapter": adapter, "dpo_png": png}
    if cfg.sft_adapter:
        outputs["base"] = run.dir / "sft_merged_base.nemo"  # what the adapter applies to (export/eval use it)
    data = {role: list(OmegaConf.to_container(cfg.model.data.data_prefix)[role]) for role in aligner.SPLIT_ROLES}
    run.finish(summary, outputs=outputs, inputs={"base": cfg.pretrained_checkpoint.restore_from_path,
                                                 "sft_adapter": cfg.sft_adapter, **data})
    if train:
        run.log(f"{len(train)} steps; preference loss {train[0].get('preference_loss'):.4f} -> "
                f"{train[-1].get('preference_loss'):.4f} (ln 2 = {math.log(2):.4f}); rewards at step 0 "
                f"{train[0].get('rewards_chosen_mean'):.4f} / {train[0].get('rewards_rejected_mean'):.4f}"
                + (f"; validation accuracy {val[-1].get('acc'):.3f}, preference loss "
                   f"{val[-1].get('preference_loss'):.4f}" if val else ""))
    run.log(f"adapter: {adapter}; metrics: {run.metrics}; plot: {png}")
    return summary


def plot_preference(metrics: Path, out: Path, title: str) -> Path:
    """Loss, rewards chosen/rejected, their margin and accuracy, train (per step) and validation."""
    def margin(r):
        return r.get("rewards_chosen_mean", 0) - r.get("rewards_rejected_mean", 0)
    return aligner.plot_panels(metrics, out, title, [
        ("preference loss (ln 2 = no preference)", [("preference_loss", "loss")], math.log(2)),
        ("implicit reward (beta log pi/pi_ref)", [("rewards_chosen_mean", "chosen"), ("rewards_rejected_mean", "rejected")], None),
        ("reward margin chosen - rejected", [(margin, "margin")], 0.0),
        ("reward accuracy (chosen > rejected)", [("acc", "accuracy")], 0.5)])


@stage_main("dpo", "dpo")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
