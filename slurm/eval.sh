#!/bin/bash
# Evaluate an exported adapter and apply the gates: one task; Hydra overrides after the script name.
#   sbatch slurm/eval.sh from_run=runs/export/nemo-ft-export
# A failed gate exits 3, which fails the job (and so the last job of slurm/pipeline.sh).
# Default out_dir: runs/eval/<job name> (report.md, report.json, metrics.png).
#SBATCH --job-name=nemo-ft-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage eval out_dir="${OUT_DIR:-runs/eval/${SLURM_JOB_NAME:-nemo-ft-eval}}" "$@"
