#!/bin/bash
# LoRA SFT on SLURM: one task per GPU; Hydra overrides after the script name.
#   sbatch slurm/sft_lora.sh model=llama3_8b parallel=tp2 model.restore_from_path=/models/l3_8b.nemo \
#       'model.data.train_ds.file_names=[data/train.jsonl]' 'model.data.validation_ds.file_names=[data/val.jsonl]'
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/sft_lora.sh parallel=tp8_pp2 ...
# --nodes must equal trainer.num_nodes and --ntasks-per-node trainer.devices of the parallel profile
# (checked before anything starts). Requeued (scontrol requeue, preemption), the job resumes from its
# last checkpoint: the same run.dir is reused (default runs/sft/<job name>). 120 s before the time
# limit the stage gets SIGUSR1 to checkpoint and stop, and the job requeues itself (slurm/_launch.sh).
#SBATCH --job-name=nemo-ft-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
nemo_ft_stage sft run.dir="${RUN_DIR:-runs/sft/${SLURM_JOB_NAME:-nemo-ft-sft}}" "$@"
