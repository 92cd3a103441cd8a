#!/bin/bash
# Export an sft/dpo run's adapter (any TP/PP) to the TP=1 .nemo, HF-PEFT, HF base, merged and NIM
# layouts, each checked by restoring it: one task.
#   sbatch slurm/export.sh from_run=runs/sft/nemo-ft-sft [merge=true] [out_dir=exports/a]
# Default out_dir: runs/export/<job name>. A failed export leaves no out_dir behind.
#SBATCH --job-name=nemo-ft-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage export out_dir="${OUT_DIR:-runs/export/${SLURM_JOB_NAME:-nemo-ft-export}}" "$@"
