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

import json
import math
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_ft import artifacts, reshard
from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_aligner_loop, check_parallel, check_peft, check_restore, check_stack
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.nemo_archive import NemoArchive
from nemo_ft.stages import lifecycle
from nemo_ft.stages.metrics import read_metrics

BASE_KEY = "pretrained_checkpoint.restore_from_path"
NEMO_INPUTS = (BASE_KEY, "sft_adapter", "model.peft.restore_from_path")
SPLIT_ROLES = ("train", "validation", "test")


def derive(cfg: DictConfig) -> list[str]:
    notes = []
    if cfg.from_run:
        m = artifacts.read_manifest(cfg.from_run, stage="sft", key="from_run")
        cfg.sft_adapter = cfg.sft_adapter or str(m.output("adapter"))
        base = (m.input("base") or {}).get("path")
        if base:
            cfg.pretrained_checkpoint.restore_from_path = base
        notes.append(f"from {m.path}: SFT adapter {cfg.sft_adapter} merged into {base} before DPO")
    if cfg.data_dir:
        prep = artifacts.read_manifest(cfg.data_dir, stage="prep", key="data_dir")
        cfg.model.data.data_prefix = {role: [str(prep.output(role))] for role in SPLIT_ROLES}
    return notes


def _rows(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _split_file(cfg, role):
    files = list(OmegaConf.select(cfg, f"model.data.data_prefix.{role}") or [])
    return files[0] if len(files) == 1 else None


def over_length_pairs(cfg) -> dict:
    """{split: line numbers of pairs longer than model.data.seq_length}, measured the way Aligner's
    DPOModelDataset measures them, with the base's own tokenizer."""
    import tempfile

    from nemo_ft.data.tokenize import Tokenizer, dpo_pair_length

    with NemoArchive(OmegaConf.select(cfg, BASE_KEY), key=BASE_KEY) as a:
        name = a.tokenizer_file()
        found = [n for n in a.files() if Path(n).name == name] if name else []
        if not found or not name.endswith(".model"):
            return {}
        data = a.read(found[0])
    seq, eod = int(cfg.model.data.seq_length), bool(cfg.model.data.append_eod)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(data)
        tok = Tokenizer("sentencepiece", str(Path(d) / name))
        for role in ("train", "validation"):
            path = _split_file(cfg, role)
            if path and Path(path).exists():
                rows = _rows(path)
                out[role] = [i + 1 for i, r in enumerate(rows) if "chosen_response" in r
                             and dpo_pair_length(tok, r, eod) > seq]
    return out


def _base_tokenizer_sha(cfg):
    with NemoArchive(OmegaConf.select(cfg, BASE_KEY), key=BASE_KEY) as a:
        return a.tokenizer_sha256()


def check_data(cfg: DictConfig, base_ok: bool) -> list:
    """Aligner's DPO dataset, asked the questions it answers only at train time (or never)."""
    errors = []
    if cfg.model.data.data_prefix is None:
        return [ConfigError("model.data.data_prefix", "is required: {train: [f], validation: [f], test: [f]} of "
                                                      "`nemo-ft prep task=dpo` output (or data_dir=<that out_dir>)")]
    if cfg.model.data.over_length not in ("reject", "keep"):
        errors.append(ConfigError("model.data.over_length", f"{cfg.model.data.over_length!r}: expected reject or keep"))
    gbs = int(cfg.model.global_batch_size)
    base_tok = _base_tokenizer_sha(cfg) if base_ok else None
    for role in ("train", "validation"):
        key = f"model.data.data_prefix.{role}"
        path = _split_file(cfg, role)
        if path is None:
            errors.append(ConfigError(key, "one JSONL file per split (Aligner reads a one-element list)"))
            continue
        if not Path(path).exists():
            errors.append(ConfigError(key, f"file not found: {path}"))
            continue
        rows = _rows(path)
        if rows and "chosen_response" not in rows[0]:
            errors.append(InputError("rows are not Aligner DPO rows {prompt, chosen_response, rejected_response}; "
                                     "run `nemo-ft prep task=dpo`", path=path, key=key))
        if len(rows) < gbs:  # Aligner: zero steps per epoch (train) or zero batches (validation)
            errors.append(InputError(f"holds {len(rows)} pair(s), fewer than one global batch "
                                     f"(model.global_batch_size={gbs}): Aligner would run zero steps; add pairs or "
                                     "lower the batch", path=path, key=key))
        try:
            m = artifacts.manifest_next_to(path)
            if m is None or m.stage != "prep":
                continue
            m.verify(m.record_for(path))
            if m.summary.get("task") != "dpo":
                errors.append(InputError(f"was prepared with task={m.summary.get('task')}; DPO needs task=dpo",
                                         path=path, key=key))
            append_eod = bool((m.config or {}).get("dpo", {}).get("append_eod", False))
            if append_eod != bool(cfg.model.data.append_eod):
                errors.append(ConfigError("model.data.append_eod", f"{path} was prepared with dpo.append_eod="
                                          f"{append_eod} (its lengths and prefix checks assume it); set "
                                          f"model.data.append_eod={str(append_eod).lower()}"))
            prep_tok = (m.summary.get("tokenizer") or {}).get("sha256")
            if prep_tok and base_tok and prep_tok != base_tok:
                errors.append(InputError("was tokenized by prep with another tokenizer than the base's; re-run prep "
                                         "with the base's tokenizer", path=path, key=key))
        except InputError as err:
            errors.append(err)
    if base_ok and cfg.model.data.over_length == "reject" and not errors:
        for role, lines in over_length_pairs(cfg).items():
            if lines:
                rows = len(_rows(_split_file(cfg, role)))
                errors.append(InputError(f"{len(lines)} of {rows} pairs are longer than model.data.seq_length="
                                         f"{cfg.model.data.seq_length} (lines {lines[:5]}): Aligner would train on "
                                         "them with zero loss, silently. Re-prep with that seq_length, or set "
                                         "model.data.over_length=keep", path=_split_file(cfg, role),
                                         key=f"model.data.data_prefix.{role}"))
    return errors


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    restore = list(check_restore(cfg, key=BASE_KEY)) if BASE_KEY not in skip else []
    errors = list(restore)
    errors += list(check_parallel(cfg)) + list(check_peft(cfg)) + list(check_stack(cfg)) + list(check_aligner_loop(cfg, "dpo"))
    if cfg.model.peft.peft_scheme not in ("lora", "none"):
        errors.append(ConfigError("model.peft.peft_scheme", "Aligner's DPO supports lora or none (full fine-tuning)"))
    if cfg.sft_adapter and cfg.model.peft.get("restore_from_path"):
        errors.append(ConfigError("sft_adapter", "give sft_adapter (merged into the base: the reference is the SFT "
                                                 "model) or model.peft.restore_from_path (trained on; NOT in the "
                                                 "reference), not both"))
    base = OmegaConf.select(cfg, BASE_KEY)
    base_ok = bool(base) and Path(base).exists() and BASE_KEY not in skip and not restore
    if base_ok and cfg.sft_adapter and Path(str(cfg.sft_adapter)).exists() and "sft_adapter" not in skip:
        with NemoArchive(base, key=BASE_KEY) as a:
            base_conf = a.config()
        with NemoArchive(cfg.sft_adapter, key="sft_adapter") as a:
            conf = a.config()
        if (conf.get("peft") or {}).get("peft_scheme") != "lora":
            errors.append(InputError("only a LoRA adapter merges into the base", path=cfg.sft_adapter, key="sft_adapter"))
        for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if conf.get(k) != base_conf.get(k):
                errors.append(InputError(f"was trained on another base: {k} is {conf.get(k)!r}, the base's "
                                         f"{base_conf.get(k)!r}", path=cfg.sft_adapter, key="sft_adapter"))
                break
    errors += check_data(cfg, base_ok)
    return errors


def merge_sft(run, cfg) -> Path:
    """The base with the SFT adapter folded in (W + (alpha/r) B A, fp32), saved as a base .nemo."""
    import torch

    from nemo_ft.export import merge_lora

    model = run.restore(cfg.pretrained_checkpoint.restore_from_path)
    adapter = reshard.read_adapter(cfg.sft_adapter, key="sft_adapter")
    params = dict(model.model.named_parameters())
    base_np = {k: p.detach().float().numpy() for k, p in params.items()}
    merged = merge_lora(base_np, adapter.canonical, adapter.spec)
    with torch.no_grad():
        for k, v in merged.items():
            if v is not base_np[k]:
                params[k].copy_(torch.from_numpy(v).to(params[k].dtype))
    out, _ = run.save_nemo(model, run.dir / "sft_merged_base.nemo")
    del model
    run.log(f"merged {cfg.sft_adapter} into the base -> {out.name} (the reference policy)")
    return out


def run(cfg: DictConfig) -> dict:
    from nemo_aligner.algorithms.dpo import DPOTrainer, dpo_custom_collate
    from nemo_aligner.data.nlp.builders import build_dataloader, build_train_valid_test_dpo_datasets, identity_collate
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_aligner.utils.distributed import Timer
    from nemo_aligner.utils.train_script_utils import (CustomLoggerWrapper, add_custom_checkpoint_callback,
                                                       extract_optimizer_scheduler_from_ptl_model, init_distributed,
                                                       init_peft, init_using_ptl, retrieve_custom_trainer_state_dict)

    from nemo_ft.stages.callbacks import jsonl_logger

    run = lifecycle.start("dpo", cfg, checks=checks, derive=derive, nemo_inputs=NEMO_INPUTS, aligner=True)
    base = Path(cfg.pretrained_checkpoint.restore_from_path)
    if cfg.sft_adapter:
        base = merge_sft(run, cfg)
    model = run.restore(base, model_cls=MegatronGPTDPOModel)
    init_peft(model, model.cfg)
    before = lifecycle.param_digests(model)
    init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))

    gbs, mbs = int(cfg.model.global_batch_size), int(cfg.model.micro_batch_size)
    data_cfg = model.cfg.copy()
    with open_dict(data_cfg):
        data_cfg.data.data_prefix = OmegaConf.to_container(cfg.model.data.data_prefix)
        data_cfg.data.index_mapping_dir = str(run.dir / "data_index")
    train_ds, val_ds, _ = build_train_valid_test_dpo_datasets(
        cfg=data_cfg, data_prefix=data_cfg.data.data_prefix, data_impl="jsonl", splits_string=None,
        train_valid_test_num_samples=[-1 * gbs] * 3, seq_length=int(cfg.model.data.seq_length), seed=cfg.model.seed,
        tokenizer=model.tokenizer)
    state = retrieve_custom_trainer_state_dict(run.trainer) if run.trainer.ckpt_path else None
    consumed = state["consumed_samples"] if state else 0
    loader_cfg = OmegaConf.create({"model": {"seed": cfg.model.seed, "data": {"num_workers": 0}}})
    train_dl = build_dataloader(cfg=loader_cfg, dataset=train_ds, consumed_samples=consumed, mbs=mbs, gbs=gbs,
                                load_gbs=True, pad_samples_to_global_batch_size=False, collate_fn=identity_collate)
    val_dl = build_dataloader(cfg=loader_cfg, dataset=val_ds, consumed_samples=0, mbs=mbs, gbs=gbs, load_gbs=True,
                              pad_samples_to_global_batch_size=False, collate_fn=identity_collate,
                              use_random_sampler=False)
    init_using_ptl(run.trainer, model, train_dl, train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
    logger = CustomLoggerWrapper(list(run.trainer.loggers) + [jsonl_logger(run.metrics, run.rank0)])
    trainer = DPOTrainer(
        cfg=cfg.trainer.dpo, model=model, optimizer=optimizer, scheduler=scheduler, train_dataloader=train_dl,
        val_dataloader=val_dl, test_dataloader=None,
        collate_fn=partial(dpo_custom_collate, eos_id=model.tokenizer.eos_id,
                           reset_position_ids=cfg.model.data.reset_position_ids,
                           reset_attention_mask=cfg.model.data.reset_attention_mask,
                           eod_mask_loss=cfg.model.data.eod_mask_loss),
        logger=logger, ckpt_callback=add_custom_checkpoint_callback(run.trainer, model),
        run_timer=Timer(cfg.exp_manager.get("max_time_per_run")),
        pad_length_to_multiple_of=cfg.model.data.pad_length_to_multiple_of)
    if state is not None:
        trainer.load_state_dict(state)
    trainer.fit()
    after = lifecycle.param_digests(model)

    tp, pp = run.rt.tp, run.rt.pp
    lora = cfg.model.peft.peft_scheme == "lora"
    adapter, saved = run.save_nemo(model, run.dir / f"{cfg.run.adapter_name}.nemo",
                                   check=(lambda p: lifecycle.check_adapter_file(p, tp, pp)) if lora else None)
    if not run.rank0:
        return {}
    train, val = read_metrics(run.metrics)
    over = {r: len(lines) for r, lines in over_length_pairs(cfg).items()} if cfg.model.data.over_length == "keep" else {}
    summary = {
        "adapter": str(adapter), "peft_scheme": cfg.model.peft.peft_scheme, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp, "saved": saved, "preference_loss": cfg.model.dpo.preference_loss,
        "beta": cfg.model.dpo.ref_policy_kl_penalty, "reference": "the SFT-merged base" if cfg.sft_adapter else
        "the base (adapters off)", "frozen_params_unchanged": before["frozen"] == after["frozen"],
        "trainable_params_changed": before["trainable"] != after["trainable"], "steps": len(train),
        "step0": {k: train[0].get(k) for k in ("loss", "rewards_chosen_mean", "rewards_rejected_mean", "acc")} if train else None,
        "last": train[-1] if train else None, "val_last": val[-1] if val else None, "pairs_over_seq_length_kept": over,
    }
    png = plot_preference(run.metrics, run.dir / "dpo.png", f"DPO ({cfg.model.dpo.preference_loss}, beta "
                                                           f"{cfg.model.dpo.ref_policy_kl_penalty}), TP={tp} PP={pp}")
    outputs = {"adapter": adapter, "dpo_png": png}
    if cfg.sft_adapter:
        outputs["base"] = run.dir / "sft_merged_base.nemo"  # what the adapter applies to (export/eval use it)
    data = {role: list(OmegaConf.to_container(cfg.model.data.data_prefix)[role]) for role in SPLIT_ROLES}
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps, vsteps = [r["step"] for r in train], [r["step"] for r in val]
    panels = [("loss", "loss (ln 2 = no preference)"), ("rewards", "implicit reward (beta log pi/pi_ref)"),
              ("margin", "reward margin chosen - rejected"), ("acc", "reward accuracy (chosen > rejected)")]
    for ax, (key, label) in zip(axes.flat, panels):
        if key == "rewards":
            ax.plot(steps, [r.get("rewards_chosen_mean") for r in train], label="chosen (train)", lw=1)
            ax.plot(steps, [r.get("rewards_rejected_mean") for r in train], label="rejected (train)", lw=1)
            if val:
                ax.plot(vsteps, [r.get("rewards_chosen_mean") for r in val], "o-", label="chosen (validation)")
                ax.plot(vsteps, [r.get("rewards_rejected_mean") for r in val], "o-", label="rejected (validation)")
        else:
            def get(r):
                return (r.get("rewards_chosen_mean", 0) - r.get("rewards_rejected_mean", 0)) if key == "margin" else r.get(key)
            ax.plot(steps, [get(r) for r in train], label="train", lw=1)
            if val:
                ax.plot(vsteps, [get(r) for r in val], "o-", label="validation")
        if key == "loss":
            ax.axhline(0.6931, color="grey", ls=":", lw=1)
        if key == "acc":
            ax.axhline(0.5, color="grey", ls=":", lw=1)
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with artifacts.atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


@stage_main("dpo", "dpo")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
