"""`nemo-ft rm`: a binary-ranking reward model through NeMo-Aligner 0.7.0 (MegatronGPTRewardModel +
SupervisedTrainer), full-parameter, on `nemo-ft prep task=rm` pairs.

    nemo-ft rm data_dir=runs/demo/prep_rm run.dir=runs/demo/rm

The steps of Aligner's train_reward_model.py on the shared lifecycle, its sharp edges handled before
anything is built: fewer pairs than one global batch (zero steps per epoch, then ZeroDivisionError),
a validation set that would come out empty, pairs longer than seq_length (its dataset skips the pair
*and its neighbour*; prep task=rm already rejects them, re-checked here), micro batches > 1 on the local
attention spec (its mask has one row per pair, the batch two), the Transformer Engine spec chosen
regardless (patched). Writes rm.nemo (the whole model and its reward head), metrics.jsonl, rm.png.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_aligner_loop, check_parallel, check_restore, check_stack
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.stages import _aligner as aligner, lifecycle
from nemo_ft.stages._metrics import read_metrics

BASE_KEY = "pretrained_checkpoint.restore_from_path"


def derive(cfg: DictConfig) -> list[str]:
    if cfg.data_dir:
        cfg.model.data.data_prefix = aligner.data_prefix_from(cfg.data_dir)
    return []


def _pairs(lines: list) -> int:
    return len(lines) // 2


def over_length_pairs(cfg) -> dict:
    """{split: pair numbers} whose chosen or rejected text is longer than seq_length, counted the way
    Aligner's RewardModelDataset counts (text_to_ids of the whole text, + EOS with append_eod)."""
    seq, eod, out = int(cfg.model.data.seq_length), int(bool(cfg.model.data.append_eod)), {}
    with aligner.nemo_tokenizer(OmegaConf.select(cfg, BASE_KEY), BASE_KEY) as tok:
        for role in ("train", "validation") if tok else ():
            path = aligner.split_file(cfg, role)
            if path and Path(path).exists():
                lines = aligner.rows(path)
                out[role] = sorted({i // 2 + 1 for i, r in enumerate(lines) if len(tok.encode(r["text"])) + eod > seq})
    return out


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    restore = list(check_restore(cfg, key=BASE_KEY)) if BASE_KEY not in skip else []
    errors = restore + list(check_parallel(cfg)) + list(check_stack(cfg)) + list(check_aligner_loop(cfg, "rm"))
    if cfg.model.reward_model_type != "binary_ranking":
        errors.append(ConfigError("model.reward_model_type", "only binary_ranking is wired here (the regression "
                                                             "model needs multi-attribute labels)"))
    if cfg.model.peft.peft_scheme != "none":
        errors.append(ConfigError("model.peft.peft_scheme", "Aligner 0.7.0's reward model has no adapter mixin: "
                                                            "full-parameter only (peft=none)"))
    if int(cfg.model.micro_batch_size) > 1 and importlib.util.find_spec("transformer_engine") is None:
        errors.append(ConfigError("model.micro_batch_size", "> 1 fails in Aligner's reward model without Transformer "
                                                            "Engine (the local spec's attention mask has one row per "
                                                            "pair, the batch two): use 1 and a larger global batch"))
    base = OmegaConf.select(cfg, BASE_KEY)
    base_ok = bool(base) and Path(base).exists() and not restore
    errors += aligner.check_splits(cfg, task="rm", units=_pairs, unit="pair", row_keys=("text",),
                                   append_eod=bool(cfg.model.data.append_eod), append_eod_key="model.data.append_eod",
                                   prep_eod_key="rm.append_eod",
                                   base_tok=aligner.base_tokenizer_sha(base) if base_ok else None)
    for role in ("train", "validation"):
        path = aligner.split_file(cfg, role)
        if path and Path(path).exists() and len(aligner.rows(path)) % 2:
            errors.append(InputError("has an odd number of lines: Aligner reads lines as chosen/rejected pairs",
                                     path=path, key=f"model.data.data_prefix.{role}"))
    if base_ok and not errors:
        for role, pairs in over_length_pairs(cfg).items():
            if pairs:
                errors.append(InputError(f"{len(pairs)} pair(s) longer than model.data.seq_length="
                                         f"{cfg.model.data.seq_length} (pairs {pairs[:5]}): Aligner's dataset would "
                                         "skip each and the pair after it, silently; re-run prep task=rm with that "
                                         "seq_length", path=aligner.split_file(cfg, role),
                                         key=f"model.data.data_prefix.{role}"))
    return errors


def run(cfg: DictConfig) -> dict:
    from nemo_aligner.algorithms.supervised import SupervisedTrainer
    from nemo_aligner.data.nlp.builders import build_train_valid_test_rm_datasets
    from nemo_aligner.models.nlp.gpt.reward_model_classes import REWARD_MODEL_CLASS_DICT, RewardModelType

    run = lifecycle.start("rm", cfg, checks=checks, derive=derive, nemo_inputs=(BASE_KEY,), aligner=True)
    model_cls = REWARD_MODEL_CLASS_DICT[RewardModelType(cfg.model.reward_model_type)]
    from nemo_aligner.utils.utils import CustomSaveRestoreConnector

    # The base has no reward head: Aligner's connector loads the GPT weights only (load_base_model_only)
    # and the head starts from its init.
    model = run.restore(cfg.pretrained_checkpoint.restore_from_path, model_cls=model_cls,
                        connector=CustomSaveRestoreConnector(load_base_model_only=True))
    loop = aligner.setup_loop(run, model, build_train_valid_test_rm_datasets,
                              train_random=bool(cfg.trainer.rm.train_random_sampler),
                              val_random=bool(cfg.trainer.rm.val_random_sampler))
    trainer = SupervisedTrainer(cfg=cfg.trainer.rm, model=model, optimizer=loop.optimizer, scheduler=loop.scheduler,
                                train_dataloader=loop.train_dl, val_dataloader=loop.val_dl, test_dataloader=None,
                                logger=loop.logger, ckpt_callback=loop.ckpt_callback, run_timer=loop.run_timer,
                                run_init_validation=True)
    if loop.state is not None:
        trainer.load_state_dict(loop.state)
    trainer.fit()
    aligner.check_preempted(run, loop.run_timer, trainer.step)
    out, _ = run.save_nemo(model, run.dir / "rm.nemo")
    if not run.rank0:
        return {}
    train, val = read_metrics(run.metrics)
    summary = {"reward_model": str(out), "reward_model_type": cfg.model.reward_model_type, "steps": len(train),
               "val_first": val[0] if val else None, "val_last": val[-1] if val else None,
               "tensor_model_parallel_size": run.rt.tp, "pipeline_model_parallel_size": run.rt.pp}
    png = aligner.plot_panels(run.metrics, run.dir / "rm.png", f"reward model ({cfg.model.reward_model_type})", [
        ("ranking loss -log sigmoid(r_chosen - r_rejected)", [("loss", "loss")], math.log(2)),
        ("pair accuracy (r_chosen > r_rejected)", [("acc", "accuracy")], 0.5),
        ("mean reward", [("rewards_chosen_mean", "chosen"), ("rewards_rejected_mean", "rejected")], None)])
    data = {role: list(OmegaConf.to_container(cfg.model.data.data_prefix)[role]) for role in aligner.SPLIT_ROLES}
    run.finish(summary, outputs={"reward_model": out, "rm_png": png},
               inputs={"base": cfg.pretrained_checkpoint.restore_from_path, **data})
    if val:
        run.log(f"{len(train)} steps; validation accuracy {val[0].get('acc'):.3f} -> {val[-1].get('acc'):.3f}, "
                f"loss {val[0].get('loss'):.4f} -> {val[-1].get('loss'):.4f}")
    run.log(f"reward model: {out}; plot: {png}")
    return summary


@stage_main("rm", "rm")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
