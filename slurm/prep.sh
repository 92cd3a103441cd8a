#!/bin/bash
# Data prep on one node, all its cores:  sbatch slurm/prep.sh input=raw.jsonl out_dir=data/prepped pack=true
#SBATCH --job-name=nemo-ft-prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage prep "$@"
