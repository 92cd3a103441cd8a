#!/bin/bash
# One srun task of a stage (slurm/_launch.sh runs `srun ... bash slurm/_task.sh <python> <args>`): say
# where it runs, then become the payload (exec: SLURM's and the batch shell's signals reach python itself).
ip=$(hostname -I 2>/dev/null | cut -d" " -f1)
echo "[nemo-ft slurm] rank ${SLURM_PROCID:-0}/${SLURM_NTASKS:-1} on $(hostname) (${ip:-?}) node ${SLURM_NODEID:-0}" \
     "local rank ${SLURM_LOCALID:-0}"
exec "$@"
