"""`nemo-ft ppo`: PPO with a LoRA policy through NeMo-Aligner 0.7.0's own classes (MegatronGPTActorModel +
PPOTrainer + RemoteGPTRMCriticClient), against the critic server the stage starts itself.

    nemo-ft ppo from_run=runs/demo/sft data_dir=runs/demo/prep_rlhf reward.from_run=runs/demo/rm

The same stage as `nemo-ft reinforce` (nemo_ft.stages.reinforce: the lifecycle, the checks, the server
started, waited for and stopped on every exit path, the saved adapter), with Aligner's PPO actor and its
one server: `nemo-ft critic_server`, the critic initialized from the reward model and serving that
reward model's rewards too (Aligner's combined critic/RM server). The critic trains on each step's
returns in its own process and is checkpointed there (critic_server/ below run.dir).
"""
from __future__ import annotations

from omegaconf import DictConfig

from nemo_ft.config.entry import stage_main
from nemo_ft.stages import _rlhf as rlhf
from nemo_ft.stages.reinforce import Algorithm, entry

PPO = Algorithm("ppo", "PPO (critic + reward model server)",
                "nemo_aligner.models.nlp.gpt.megatron_gpt_ppo_actor:MegatronGPTActorModel",
                "nemo_aligner.algorithms.ppo:PPOTrainer",
                "nemo_aligner.models.nlp.gpt.reward_critic_clients:RemoteGPTRMCriticClient", "rm_critic",
                rlhf.CriticService, False)


@stage_main("ppo", "ppo")
def main(cfg: DictConfig) -> None:
    entry(cfg, PPO)


if __name__ == "__main__":
    main()
