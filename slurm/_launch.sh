# Shared by the sbatch scripts: find the checkout, pick the python, one srun task per device.
# Sourced, not run. Honours: NEMO_FT_PY (python with the stack; default the checkout's .venv, else
# python3 as in the NGC container), NEMO_FT_CONTAINER (an image for srun --container-image, pyxis).
set -euo pipefail
NEMO_FT_ROOT=${NEMO_FT_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$NEMO_FT_ROOT"
if [ -z "${NEMO_FT_PY:-}" ]; then
  if [ -x .venv/bin/python ]; then NEMO_FT_PY=$NEMO_FT_ROOT/.venv/bin/python; else NEMO_FT_PY=python3; fi
fi
# NeMo's dataset helper compiles with `python3 -m pybind11`: the python's bin first on PATH.
export PATH="$(dirname "$NEMO_FT_PY"):$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
# Every task derives the same rendezvous from the job (nemo_ft.runtime does the same if unset).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo 127.0.0.1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
container_args=()
if [ -n "${NEMO_FT_CONTAINER:-}" ]; then
  container_args=(--container-image="$NEMO_FT_CONTAINER" --container-mounts="$NEMO_FT_ROOT:$NEMO_FT_ROOT" --container-workdir="$NEMO_FT_ROOT")
fi
echo "[nemo-ft slurm] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS task(s) on ${SLURM_JOB_NODELIST:-?}, python $NEMO_FT_PY"

nemo_ft_stage() {  # nemo_ft_stage <stage> [hydra overrides...]
  local stage=$1; shift
  srun --kill-on-bad-exit=1 "${container_args[@]}" "$NEMO_FT_PY" -m "nemo_ft.stages.$stage" "$@"
}
