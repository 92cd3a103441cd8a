#!/bin/bash
# DPO (NeMo-Aligner) with LoRA on SLURM, starting from an SFT run: one task per GPU; Hydra overrides
# after the script name.
#   sbatch slurm/dpo_lora.sh from_run=runs/sft/nemo-ft-sft data_dir=runs/prep_dpo
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/dpo_lora.sh parallel=tp8_pp2 from_run=...
# from_run: the sft run whose manifest names the base and the adapter (merged into the base: the
# reference policy); data_dir: a `nemo-ft prep task=dpo` out_dir (slurm/prep.sh task=dpo ...).
# --nodes / --ntasks-per-node must match trainer.num_nodes / trainer.devices (checked before anything
# starts). Requeued, it resumes from its last checkpoint in the same run.dir (default runs/dpo/<job
# name>); SIGUSR1 120 s before the time limit asks the stage to checkpoint and stop (slurm/_launch.sh).
#SBATCH --job-name=nemo-ft-dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage dpo run.dir="${RUN_DIR:-runs/dpo/${SLURM_JOB_NAME:-nemo-ft-dpo}}" "$@"
