"""`nemo-ft critic_server`: NeMo-Aligner 0.7.0's PPO critic server (MegatronGPTCriticModel +
CriticServerTrainer), which the PPO actor calls over PyTriton to get values (and, combined with the
reward model, rewards), to train the critic on each step's returns, and to save it.

    nemo-ft critic_server from_run=runs/demo/rm trainer.ppo.port=5556

The steps of Aligner's serve_ppo_critic.py on the shared lifecycle: the critic is restored from a
`nemo-ft rm` reward model with the critic's keys merged over its config (a value per token), the reward
model's state is kept on the CPU for the combined server, and Triton binds `host` (127.0.0.1 unless an
actor elsewhere must reach it; Aligner hard-codes 0.0.0.0). `nemo-ft ppo` starts this as a child process,
waits for its readiness URLs and stops it on every exit path (nemo_ft.stages._rlhf). Each critic
training step (loss, grad norm, lr) is a line of metrics.jsonl in this server's run.dir.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from nemo_ft import artifacts
from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_parallel, check_restore, check_stack
from nemo_ft.errors import ConfigError

KEY = "pretrained_checkpoint.restore_from_path"
MODELS = ("critic_infer", "critic_train", "critic_save")  # what CriticServerTrainer.run_server binds


def derive(cfg: DictConfig) -> list[str]:
    if cfg.from_run and not cfg.pretrained_checkpoint.restore_from_path:
        m = artifacts.read_manifest(cfg.from_run, stage="rm", key="from_run")
        cfg.pretrained_checkpoint.restore_from_path = str(m.output("reward_model"))
    return []


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    errors = [] if KEY in skip else list(check_restore(cfg, key=KEY))
    errors += list(check_parallel(cfg)) + list(check_stack(cfg))
    port = cfg.trainer.ppo.port
    if not isinstance(port, int) or not 0 < port < 65536:
        errors.append(ConfigError("trainer.ppo.port", f"{port!r}: expected a TCP port"))
    if int(cfg.model.micro_batch_size) != 1:
        errors.append(ConfigError("model.micro_batch_size", f"{cfg.model.micro_batch_size}: > 1 fails without "
                                                            "Transformer Engine (the local spec's attention mask)"))
    if not cfg.pretrained_checkpoint.restore_from_path:
        errors.append(ConfigError(KEY, "the critic starts from a reward model: pretrained_checkpoint."
                                       "restore_from_path=<rm.nemo> or from_run=<a nemo-ft rm run dir>"))
    return errors


def run(cfg: DictConfig) -> None:
    from nemo_ft.runtime import servers
    from nemo_ft.stages import lifecycle
    from nemo_ft.stages.callbacks import jsonl_logger

    run = lifecycle.start("critic_server", cfg, checks=checks, derive=derive, nemo_inputs=(KEY,), rlhf=True)
    from nemo_aligner.algorithms import critic_server_trainer
    from nemo_aligner.algorithms.critic_server_trainer import CriticServerTrainer
    from nemo_aligner.models.nlp.gpt.megatron_gpt_critic import MegatronGPTCriticModel
    from nemo_aligner.utils.text_generation_utils import tokenize_batch
    from nemo_aligner.utils.train_script_utils import (CustomLoggerWrapper, add_custom_checkpoint_callback,
                                                       extract_optimizer_scheduler_from_ptl_model, init_distributed,
                                                       init_using_ptl, retrieve_custom_trainer_state_dict)
    from nemo_aligner.utils.utils import copy_model_states_to_cpu

    model = run.restore(cfg.pretrained_checkpoint.restore_from_path, model_cls=MegatronGPTCriticModel)
    if cfg.trainer.ppo.combine_rm_and_critic_server:
        # The reward model's weights, kept on the CPU: the server swaps them in to score, then back.
        model.rm_state_dict_cpu = copy_model_states_to_cpu(model, cpu_dict=None,
                                                           megatron_amp_O2=cfg.model.megatron_amp_O2, sync=True)
    state = retrieve_custom_trainer_state_dict(run.trainer) if run.trainer.ckpt_path else None
    init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))
    init_using_ptl(run.trainer, model, None, None)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)

    def tokenize(sentences):
        return tokenize_batch(sentences=sentences, tokenizer=model.tokenizer, max_len=model.cfg.encoder_seq_length,
                              add_BOS=False, add_EOS=False)

    trainer = CriticServerTrainer(
        cfg=cfg.trainer.ppo, model=model, optimizer=optimizer, scheduler=scheduler,
        logger=CustomLoggerWrapper(list(run.trainer.loggers) + [jsonl_logger(run.metrics, run.rank0, {"train": "train"})]),
        ckpt_callback=add_custom_checkpoint_callback(run.trainer, model),
        tokenize_func=tokenize, gbs=int(cfg.model.global_batch_size),
        model_forward_micro_batch_size=int(cfg.model.forward_micro_batch_size))
    if state is not None:
        trainer.load_state_dict(state)
    critic_server_trainer.ENDPOINT_BIND_ADDRESS = str(cfg.host)  # a module global Aligner reads in run_server
    servers.triton_env()
    run.log(f"critic ({'with the reward model, combined' if cfg.trainer.ppo.combine_rm_and_critic_server else 'alone'})"
            f" on http://{cfg.host}:{cfg.trainer.ppo.port}: {', '.join(MODELS)}")
    trainer.run_server()  # rank 0: Triton until SIGINT/SIGTERM; other ranks: Aligner's subscriber loop
    sys.stdout.flush()


@stage_main("critic_server", "critic_server")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
