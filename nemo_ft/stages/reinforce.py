"""`nemo-ft reinforce`: REINFORCE with an RLOO baseline and a LoRA policy, through NeMo-Aligner 0.7.0's own
classes (MegatronGPTReinforceActorModel + ReinforceTrainer + RemoteGPTRMClient), against a reward served
over PyTriton.

    nemo-ft reinforce from_run=runs/demo/sft data_dir=runs/demo/prep_rlhf reward.kind=rm reward.from_run=runs/demo/rm
    nemo-ft reinforce from_run=runs/demo/sft data_dir=runs/demo/prep_rlhf reward.kind=rule

The steps of Aligner's train_gpt_reinforce_actor.py on the shared lifecycle, plus what its script leaves
to the user: the reward server is started here (nemo_ft.stages._rlhf, one command on one node), waited for
with a deadline that names it, and stopped on every exit path. Up-front errors instead of mid-run
asserts: rollout sizes that do not divide into optimizer batches, fewer prompts than one rollout batch,
prompts Aligner would skip silently, TensorRT-LLM asked for but absent, RLOO with one rollout per prompt.
Aligner's initial policy (the KL reference) is the policy with adapters off: an SFT adapter is merged
into the base first (as for DPO). Writes the actor adapter .nemo, metrics.jsonl (rollout reward, KL,
stop rate; validation reward), rollouts.jsonl (a sample per step), reinforce.png.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_aligner_loop, check_parallel, check_peft, check_restore, check_stack
from nemo_ft.errors import ConfigError
from nemo_ft.stages import _aligner as aligner, _rlhf as rlhf, lifecycle
from nemo_ft.stages._metrics import read_metrics

BASE_KEY = "pretrained_checkpoint.restore_from_path"
NEMO_INPUTS = (BASE_KEY, "sft_adapter", "model.peft.restore_from_path", "reward.model")
# ReinforceTrainer's logger prefixes -> metrics.jsonl kinds.
KINDS = {"train_rollouts": "train", "val_rollouts": "validation", "train_optim": "optim", "timers": "timers"}


@dataclass(frozen=True)
class Algorithm:
    """What differs between Aligner's REINFORCE and PPO actors; the stage around them is the same."""
    name: str        # the stage, and the config sections trainer.<name> / model.<name>
    title: str
    actor: str       # module:class of the actor model, trainer, client
    trainer: str
    client: str
    client_kw: str   # the trainer's keyword for the client
    service: type    # _rlhf.RewardService or _rlhf.CriticService
    rollouts_per_prompt: bool  # RLOO samples several rollouts per prompt; PPO one


REINFORCE = Algorithm("reinforce", "REINFORCE (RLOO)",
                      "nemo_aligner.models.nlp.gpt.megatron_gpt_reinforce_actor:MegatronGPTReinforceActorModel",
                      "nemo_aligner.algorithms.reinforce:ReinforceTrainer",
                      "nemo_aligner.models.nlp.gpt.reward_critic_clients:RemoteGPTRMClient", "rm", rlhf.RewardService,
                      True)


def _load(path: str):
    import importlib
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _rollouts_per_prompt(cfg: DictConfig, algo: Algorithm) -> int:
    return int(cfg.trainer[algo.name].num_rollouts_per_prompt) if algo.rollouts_per_prompt else 1


def derive(cfg: DictConfig, algo: Algorithm = REINFORCE) -> list[str]:
    notes = aligner.from_sft_run(cfg, algo.title.split()[0])
    if cfg.data_dir:
        cfg.model.data.data_prefix = aligner.data_prefix_from(cfg.data_dir)
    steps = optimizer_steps(cfg, algo)
    if steps and OmegaConf.select(cfg, "model.optim.sched.max_steps") is None:
        # NeMo sizes the LR schedule by trainer.max_steps, but a REINFORCE step makes rollouts/global batch
        # optimizer steps: the schedule would end (at min_lr) a fraction of the way into the run.
        with open_dict(cfg):
            cfg.model.optim.sched.max_steps = steps
        notes.append(f"model.optim.sched.max_steps={steps}: the optimizer steps this run makes")
    return notes + rlhf.derive_reward(cfg)


def optimizer_steps(cfg: DictConfig, algo: Algorithm = REINFORCE):
    """Optimizer steps of the run: RLHF steps (max_steps, or an epoch of prompts) x rollouts per step /
    global batch; None if the prompt file cannot be read yet (the checks say why)."""
    path = aligner.split_file(cfg, "train")
    rl, loop = cfg.model[algo.name], cfg.trainer[algo.name]
    if not path or not Path(path).exists() or int(rl.num_rollout_samples) <= 0 or int(cfg.model.global_batch_size) <= 0:
        return None
    steps = len(aligner.rows(path)) // int(rl.num_rollout_samples) * int(loop.max_epochs)
    if int(loop.max_steps) >= 0:
        steps = min(steps, int(loop.max_steps))
    return max(1, steps * int(rl.num_rollout_samples) * _rollouts_per_prompt(cfg, algo) // int(cfg.model.global_batch_size))


def check_batches(cfg: DictConfig, algo: Algorithm = REINFORCE) -> list:
    """The divisions Aligner's RLHF trainers and Megatron's samplers make mid-run (divide() asserts)."""
    rl, loop, errors = cfg.model[algo.name], cfg.trainer[algo.name], []
    dp = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes) // (
        int(cfg.model.tensor_model_parallel_size) * int(cfg.model.pipeline_model_parallel_size))
    gbs, mbs, k = int(cfg.model.global_batch_size), int(cfg.model.micro_batch_size), _rollouts_per_prompt(cfg, algo)
    if algo is REINFORCE and k < 2:
        errors.append(ConfigError("trainer.reinforce.num_rollouts_per_prompt", f"{k}: the RLOO baseline of a rollout "
                                                                               "is the mean of the others: use >= 2"))
    if algo is REINFORCE and not float(loop.initial_policy_kl_penalty) > 0:
        errors.append(ConfigError("trainer.reinforce.initial_policy_kl_penalty",
                                  f"{loop.initial_policy_kl_penalty}: Aligner 0.7.0 fails at 0 (reinforce.py "
                                  "generate_reinforce_data: masked_mean of a 0-d KL, 'data.dim() must equal "
                                  "mask.dim()'); for (almost) no penalty use a tiny value such as 1e-6"))
    if algo is REINFORCE and mbs != 1:
        errors.append(ConfigError("model.micro_batch_size", f"{mbs}: Aligner 0.7.0's REINFORCE loss multiplies (mbs, "
                                                            "seq) log-probs by (mbs,) advantages "
                                                            "(megatron_gpt_reinforce_actor.py loss_func), which only "
                                                            "broadcasts at 1: use 1 (global_batch_size sets the "
                                                            "optimizer batch)"))
    if gbs % (mbs * dp):
        errors.append(ConfigError("model.global_batch_size", f"{gbs} is not a multiple of micro_batch_size x DP = "
                                                             f"{mbs} x {dp}"))
    n = int(rl.num_rollout_samples) * k
    if n % gbs:
        errors.append(ConfigError(f"model.{algo.name}.num_rollout_samples",
                                  f"{rl.num_rollout_samples} prompts x {k} rollouts = {n} sequences per step, not a "
                                  f"multiple of model.global_batch_size={gbs} (Aligner splits a step's rollouts into "
                                  "optimizer batches)"))
    for key, mb in (("num_rollout_samples", "rollout_micro_batch_size"),
                    ("num_val_samples", "val_rollout_micro_batch_size")):
        if int(rl[key]) % (int(rl[mb]) * dp):
            errors.append(ConfigError(f"model.{algo.name}.{key}", f"{rl[key]} is not a multiple of {mb} x DP = "
                                                                f"{rl[mb]} x {dp}"))
    if int(rl.rollout_micro_batch_size) % int(rl.forward_micro_batch_size):
        errors.append(ConfigError(f"model.{algo.name}.forward_micro_batch_size",
                                  f"{rl.forward_micro_batch_size} does not divide rollout_micro_batch_size "
                                  f"{rl.rollout_micro_batch_size}"))
    return errors


def checks(cfg: DictConfig, skip=frozenset(), algo: Algorithm = REINFORCE) -> list:
    restore = list(check_restore(cfg, key=BASE_KEY)) if BASE_KEY not in skip else []
    errors = restore + list(check_parallel(cfg)) + list(check_peft(cfg)) + list(check_stack(cfg))
    errors += list(check_aligner_loop(cfg, algo.name)) + rlhf.check_trt_llm(cfg, algo.name)
    if cfg.model.peft.peft_scheme not in ("lora", "none"):
        errors.append(ConfigError("model.peft.peft_scheme", f"Aligner's {algo.title} actor supports lora or none"))
    if algo is not REINFORCE and cfg.reward.kind != "rm":
        errors.append(ConfigError("reward.kind", f"{cfg.reward.kind!r}: PPO runs Aligner's combined critic/reward "
                                                 "model server (its separate-RM path is broken in 0.7.0): "
                                                 "reward.kind=rm with reward.from_run= or reward.model="))
    base = OmegaConf.select(cfg, BASE_KEY)
    base_ok = bool(base) and Path(base).exists() and BASE_KEY not in skip and not restore
    remote_critic = algo is not REINFORCE and bool(OmegaConf.select(cfg, "critic.remote"))
    errors += aligner.check_sft_adapter(cfg, base_ok, skip) + check_batches(cfg, algo)
    errors += rlhf.check_reward(cfg, need_model=not remote_critic)
    rl = cfg.model[algo.name]
    errors += aligner.check_splits(cfg, task="rlhf", units=len, unit="prompt", row_keys=("text",),
                                   base_tok=aligner.base_tokenizer_sha(base) if base_ok else None,
                                   minimum={"train": (int(rl.num_rollout_samples), f"model.{algo.name}.num_rollout_samples"),
                                            "validation": (int(rl.num_val_samples), f"model.{algo.name}.num_val_samples")})
    if not errors:
        errors += rlhf.check_prompts(cfg, base_ok, int(rl.length_params.max_length))
    return errors


def run(cfg: DictConfig, algo: Algorithm = REINFORCE) -> dict:
    run = lifecycle.start(algo.name, cfg, checks=partial(checks, algo=algo), derive=partial(derive, algo=algo),
                          nemo_inputs=NEMO_INPUTS, rlhf=True)
    # After start: runtime.prepare has put in the stand-ins and patches the actor's imports need.
    import torch
    from megatron.core.utils import divide
    from nemo_aligner.data.nlp.builders import (build_dataloader, build_train_valid_test_rlhf_datasets,
                                                collate_with_pad_to_max_batch)
    from nemo_aligner.utils import parallel_state
    from nemo_aligner.utils.batch_iterators import get_batch_iterator_cls
    from nemo_aligner.utils.train_script_utils import (CustomLoggerWrapper, add_custom_checkpoint_callback,
                                                       extract_optimizer_scheduler_from_ptl_model, init_distributed,
                                                       init_peft, init_using_ptl, retrieve_custom_trainer_state_dict)
    from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu

    from nemo_ft.runtime import patches
    from nemo_ft.runtime.servers import stop_signals
    from nemo_ft.stages.callbacks import jsonl_logger

    r = cfg.reward
    patches.RLHF_TIMEOUTS.update(init_s=float(r.client_init_timeout_s), inference_s=float(r.client_inference_timeout_s))
    rollouts = run.dir / "rollouts.jsonl"
    if run.rank0 and not run.resuming:
        rollouts.unlink(missing_ok=True)
    service = algo.service(cfg, run.dir, run.rank0)
    loop = cfg.trainer[algo.name]
    rm = None
    try:
        with stop_signals():
            service.start()  # comes up while the actor is restored
            base = aligner.merge_sft(run, cfg) if cfg.sft_adapter else Path(cfg.pretrained_checkpoint.restore_from_path)
            model = run.restore(base, model_cls=_load(algo.actor))
            init_peft(model, model.cfg)
            # Only full-parameter training keeps a copy of the initial policy; LoRA turns its adapters off.
            model.init_policy_state_dict = (
                retrieve_model_state_dict_in_cpu(model, megatron_amp_O2=cfg.model.megatron_amp_O2)
                if loop.initial_policy_kl_penalty > 0 and cfg.model.peft.peft_scheme == "none"
                else None)
            before = lifecycle.param_digests(model)
            state = retrieve_custom_trainer_state_dict(run.trainer) if run.trainer.ckpt_path else None
            init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))

            data_cfg = aligner.dataset_cfg(model, cfg, run.dir)
            train_ds, val_ds, _ = build_train_valid_test_rlhf_datasets(
                cfg=data_cfg, data_prefix=data_cfg.data.data_prefix, data_impl="jsonl", splits_string=None,
                train_valid_test_num_samples=[-1, -1, -1], seq_length=int(cfg.model.data.seq_length),
                seed=cfg.model.seed, tokenizer=model.tokenizer)
            nemo = run.nemo_cfg()
            rl = cfg.model[algo.name]
            collate = collate_with_pad_to_max_batch(int(rl.length_params.max_length), model.tokenizer.eos_id, nemo,
                                                    generate_masks_and_position_ids=False)
            loader_cfg = OmegaConf.create({"model": {"seed": cfg.model.seed, "data": {"num_workers": 0}}})
            train_builder = partial(build_dataloader, cfg=loader_cfg, dataset=train_ds,
                                    mbs=int(rl.rollout_micro_batch_size), gbs=int(rl.num_rollout_samples),
                                    collate_fn=collate, load_gbs=False)
            val_builder = partial(build_dataloader, cfg=loader_cfg, dataset=val_ds,
                                  mbs=int(rl.val_rollout_micro_batch_size), gbs=int(rl.num_val_samples),
                                  collate_fn=collate, load_gbs=False, use_random_sampler=False)
            # As Aligner's script: Lightning sizes the run from a train loader; the prompt loader is not one.
            dummy = torch.utils.data.DataLoader(dataset=train_ds, batch_size=divide(
                int(cfg.model.global_batch_size), parallel_state.get_data_parallel_world_size()))
            init_using_ptl(run.trainer, model, dummy, train_ds)
            del model._train_dl, dummy
            optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
            logger = CustomLoggerWrapper(list(run.trainer.loggers) + [jsonl_logger(run.metrics, run.rank0, KINDS,
                                                                                   rollouts)])
            service.wait_ready()
            run.log(f"{service.name} ready" + (f" after {service.timings['ready_s']} s" if run.rank0 and
                                               "ready_s" in service.timings else ""))
            rm = _load(algo.client)(service.client_cfg())
            timer = aligner.preemptible_timer(cfg)
            trainer = _load(algo.trainer)(
                cfg=loop, model=model, optimizer=optimizer, scheduler=scheduler,
                train_dataloader_builder=train_builder, val_dataloader_builder=val_builder, collate_fn=collate,
                **{algo.client_kw: rm}, batch_iterator_cls=get_batch_iterator_cls(loop.get("batch_iterator", {})),
                logger=logger, ckpt_callback=add_custom_checkpoint_callback(run.trainer, model),
                run_timer=timer)
            if state is not None:
                trainer.load_state_dict(state)
            trainer.fit()
            service.check_alive()
            aligner.check_preempted(run, timer, trainer.step)  # the server is stopped below either way
    finally:
        if rm is not None:
            rm.communicator.close()  # unclosed PyTriton clients keep the process alive (Aligner's own note)
        stopped = service.stop()
    tp, pp = run.rt.tp, run.rt.pp
    adapter, saved, moved = run.save_adapter(model, before)
    if not run.rank0:
        return {}
    train, val = read_metrics(run.metrics)
    summary = {
        "adapter": str(adapter), "peft_scheme": cfg.model.peft.peft_scheme, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp, "saved": saved, "reward": {"kind": r.kind, **(
            {"model": r.model} if r.kind == "rm" else {"metric": r.metric} if r.kind == "rule" else {})},
        "initial_policy": "the SFT-merged base (adapters off)" if cfg.sft_adapter else "the base (adapters off)",
        "kl_penalty": loop.initial_policy_kl_penalty,
        "rollouts_per_step": int(cfg.model[algo.name].num_rollout_samples) * _rollouts_per_prompt(cfg, algo),
        **moved, "steps": len(train),
        "rewards_first": train[0].get("rewards") if train else None,
        "rewards_last": train[-1].get("rewards") if train else None,
        "val_rewards": [v.get("rewards") for v in val], "server": {"ready_s": service.timings.get("ready_s"),
                                                                   "stop": stopped},
    }
    critic = run.dir / algo.service.server_dir / "metrics.jsonl"
    if algo is not REINFORCE and critic.exists():  # the critic server's own training steps
        losses = [json.loads(line).get("loss") for line in critic.read_text().splitlines() if line.strip()]
        summary["critic"] = {"steps": len(losses), "loss_first": losses[0] if losses else None,
                             "loss_last": losses[-1] if losses else None}
    png = plot_rlhf(run.metrics, run.dir / f"{algo.name}.png",
                    f"{algo.title}, reward={r.kind}{'/' + r.metric if r.kind == 'rule' else ''}, TP={tp} PP={pp}")
    outputs = {"adapter": adapter, f"{algo.name}_png": png, "rollouts": rollouts}
    if cfg.sft_adapter:
        outputs["base"] = run.dir / "sft_merged_base.nemo"  # what the adapter applies to (export/eval use it)
    data = {role: list(OmegaConf.to_container(cfg.model.data.data_prefix)[role]) for role in aligner.SPLIT_ROLES}
    run.finish(summary, outputs=outputs, inputs={"base": cfg.pretrained_checkpoint.restore_from_path,
                                                 "sft_adapter": cfg.sft_adapter, "reward_model": r.model, **data})
    if train:
        run.log(f"{len(train)} steps; mean rollout reward {train[0].get('rewards'):.3f} -> {train[-1].get('rewards'):.3f}"
                + (f"; validation reward {val[0].get('rewards'):.3f} -> {val[-1].get('rewards'):.3f}" if val else ""))
    run.log(f"adapter: {adapter}; plot: {png}; server stopped in {stopped.get('stop_s')} s")
    return summary


def plot_rlhf(metrics: Path, out: Path, title: str) -> Path:
    return aligner.plot_panels(metrics, out, title, [
        ("mean reward of the policy's rollouts", [("rewards", "reward")], None),
        ("KL to the initial policy (per token)", [("init_policy_kl", "KL")], 0.0),
        ("rollouts that ended (EOS) - the rest get no gradient", [("fraction_of_samples_properly_ended", "ended")], None),
        ("generated tokens per rollout", [("generation_length", "length")], None)])


def entry(cfg: DictConfig, algo: Algorithm) -> None:
    """The stage's exits: a server that failed is exit 1, SIGTERM 143, SIGINT 130 (its server stopped)."""
    import sys

    try:
        run(cfg, algo)
    except rlhf.ServerError as err:
        print(f"nemo-ft {algo.name}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt as stop:  # SIGTERM/SIGINT (stop_signals): the server is already stopped
        print(f"nemo-ft {algo.name}: stopped by {stop or 'SIGINT'}; the {algo.service.server_dir.replace('_', ' ')} "
              "was stopped", file=sys.stderr, flush=True)
        sys.exit(143 if str(stop) == "SIGTERM" else 130)


@stage_main("reinforce", "reinforce")
def main(cfg: DictConfig) -> None:
    entry(cfg, REINFORCE)


if __name__ == "__main__":
    main()
