#!/bin/bash
# Reward model training (NeMo-Aligner) on SLURM: one task per GPU; Hydra overrides after the script name.
#   sbatch slurm/rm.sh data_dir=runs/prep_rm model.restore_from_path=/models/base.nemo
# data_dir: a `nemo-ft prep task=rm` out_dir (slurm/prep.sh task=rm ...).
# --nodes / --ntasks-per-node must match trainer.num_nodes / trainer.devices (checked before anything
# starts). Requeued, it resumes from its last checkpoint in the same run.dir (default runs/rm/<job
# name>); SIGUSR1 120 s before the time limit asks the stage to checkpoint and stop (slurm/_launch.sh).
# The trained model is what slurm/rlhf_ppo.sh serves.
#SBATCH --job-name=nemo-ft-rm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage rm run.dir="${RUN_DIR:-runs/rm/${SLURM_JOB_NAME:-nemo-ft-rm}}" "$@"
