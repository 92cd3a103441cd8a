# shellcheck shell=bash
# Shared by the sbatch scripts (sourced, not run): find the checkout, pick the python or the container,
# derive the rendezvous from the job, and start a stage as one srun task per device.
#   nemo_ft_stage <stage> [hydra overrides...]    python -m nemo_ft.stages.<stage>, in every task
#   nemo_ft_srun [VAR=value...] [srun options...] -- <python args...>   the same srun line, any payload
# Honours:
#   NEMO_FT_PY                python with the stack; default the checkout's .venv, else python3 (in a
#                             container: python3, the image's)
#   NEMO_FT_CONTAINER         an image for pyxis (srun --container-image): an enroot .sqsh file
#                             (containers/README.md) or a registry tag; unset: the checkout's venv
#   NEMO_FT_CONTAINER_MOUNTS  more mounts for it, comma-separated SRC:DST (the checkout is always mounted
#                             at its own path, and the job runs there)
#   NEMO_FT_STAGE_PKG         the package the stages are imported from (default nemo_ft.stages; the tests
#                             swap in payloads)
#   DRY_RUN=1                 print the srun line and the stage's composed config (hydra --cfg job);
#                             start nothing
# Preemption: an sbatch script with `#SBATCH --signal=B:USR1@120` gets SIGUSR1 120 s before its time
# limit; this shell passes it on to the stage's tasks (srun forwards it to every task) and, if the
# stage then ends non-zero (it checkpointed and stopped: exit 75, EX_TEMPFAIL), requeues the job, which
# resumes from that checkpoint in the same run.dir. SIGTERM (scancel, preemption) reaches the tasks
# from SLURM itself; a job preempted with PreemptMode=REQUEUE and --requeue is requeued by SLURM.
set -euo pipefail
NEMO_FT_ROOT=${NEMO_FT_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$NEMO_FT_ROOT"
NEMO_FT_STAGE_PKG=${NEMO_FT_STAGE_PKG:-nemo_ft.stages}
container_args=()
if [ -n "${NEMO_FT_CONTAINER:-}" ]; then
  NEMO_FT_PY=${NEMO_FT_PY:-python3}  # the image's python (NeMo, apex, TE); a host venv would not run there
  container_args=(--container-image="$NEMO_FT_CONTAINER"
                  --container-mounts="$NEMO_FT_ROOT:$NEMO_FT_ROOT${NEMO_FT_CONTAINER_MOUNTS:+,$NEMO_FT_CONTAINER_MOUNTS}"
                  --container-workdir="$NEMO_FT_ROOT"
                  --no-container-mount-home)  # a user's ~/.local or ~/.cache must not shadow the image's packages
elif [ -z "${NEMO_FT_PY:-}" ]; then
  if [ -x .venv/bin/python ]; then NEMO_FT_PY=$NEMO_FT_ROOT/.venv/bin/python; else NEMO_FT_PY=python3; fi
fi
# NeMo's dataset helper compiles with `python3 -m pybind11`: the python's bin first on PATH.
PATH="$(dirname "$(command -v "$NEMO_FT_PY" || echo "$NEMO_FT_PY")"):$PATH"
export PATH
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
# Megatron overlaps TP/SP communication with compute only if kernels reach the GPU in the order they
# were issued: one hardware work queue per device (NeMo's own launchers set it; megatron-core warns).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL's own warnings (a fallback transport, a wrong interface) in the job log, not its INFO chatter;
# NCCL_DEBUG=INFO to see which interfaces and transports each rank picked.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Free NCCL's buffers when the collective is done instead of tying them to the caller's stream
# (recordStream), which holds memory longer: the setting NeMo's launcher uses.
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA are the cluster's to set (its site profile), never guessed here.

# Rendezvous, the same in every task without talking first (srun passes this shell's variables on).
# MASTER_ADDR: the allocation's first host, where this batch shell and rank 0 run. MASTER_PORT: one per
# job, so two jobs on one node never share it: 20000 + job id mod 10000 (nemo_ft/slurm.py; running jobs
# have different ids), below the ephemeral range so no outgoing connection holds it by chance, and
# checked free here on rank 0's node: taken (ids 10000 apart, another service), the next free one.
nemo_ft_first_host() {  # nemo_ft_first_host <nodelist>
  local hosts
  hosts=$(scontrol show hostnames "$1" 2>/dev/null) || hosts=""
  echo "${hosts%%$'\n'*}"
}
_nemo_ft_port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
nemo_ft_free_port() {  # nemo_ft_free_port <job id>
  local port=$((20000 + $1 % 10000)) tries=0
  while [ -z "${DRY_RUN:-}" ] && _nemo_ft_port_busy "$port" && [ $tries -lt 100 ]; do
    port=$((20000 + (port - 20000 + 1) % 10000)); tries=$((tries + 1))
  done
  echo "$port"
}
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(nemo_ft_first_host "${SLURM_JOB_NODELIST:-}")
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$(nemo_ft_free_port "${SLURM_JOB_ID:-0}")}
echo "[nemo-ft slurm] job ${SLURM_JOB_ID:-DRY_RUN} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-?} task(s)" \
     "on ${SLURM_JOB_NODELIST:-?}, rendezvous $MASTER_ADDR:$MASTER_PORT, python $NEMO_FT_PY${NEMO_FT_CONTAINER:+ in $NEMO_FT_CONTAINER}"

NEMO_FT_REQUEUE_EXIT=75
_nemo_ft_signal=""
_nemo_ft_srun_pid=""
_nemo_ft_interrupted=0
_nemo_ft_forward() {  # the batch shell got a signal (--signal=B:SIG@T): pass it on to the stage
  _nemo_ft_signal=$1
  _nemo_ft_interrupted=1
  echo "[nemo-ft slurm] job ${SLURM_JOB_ID:-?} got SIG$1: passing it on to the stage to checkpoint and stop"
  if [ -n "$_nemo_ft_srun_pid" ]; then kill -s "$1" "$_nemo_ft_srun_pid" 2>/dev/null || true; fi
}
trap '_nemo_ft_forward USR1' USR1

nemo_ft_srun() {  # nemo_ft_srun [VAR=value...] [srun options...] -- <python args...>
  local envs=() opts=() rc
  # Variables for this step's tasks only (srun 22.05's --export=ALL,VAR=x keeps an exported VAR's value).
  while [ $# -gt 0 ] && [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("$1"); shift; done
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local cmd=(srun --kill-on-bad-exit=1 "${opts[@]}" "${container_args[@]}"
             bash "$NEMO_FT_ROOT/slurm/_task.sh" "$NEMO_FT_PY" "$@")
  if [ ${#envs[@]} -gt 0 ]; then cmd=(env "${envs[@]}" "${cmd[@]}"); fi
  if [ -n "${DRY_RUN:-}" ]; then
    printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
    return 0
  fi
  # srun in the background: a trapped signal interrupts `wait` (not a foreground child), so the
  # handler runs at once; wait again until srun itself has ended.
  "${cmd[@]}" &
  _nemo_ft_srun_pid=$!
  while :; do
    _nemo_ft_interrupted=0
    wait "$_nemo_ft_srun_pid" && rc=0 || rc=$?
    [ "$_nemo_ft_interrupted" = 1 ] || break
  done
  _nemo_ft_srun_pid=""
  if [ -n "$_nemo_ft_signal" ] && [ "$rc" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[nemo-ft slurm] the stage stopped on SIG$_nemo_ft_signal (exit $rc; $NEMO_FT_REQUEUE_EXIT: checkpointed):" \
         "requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  return "$rc"
}

nemo_ft_stage() {  # nemo_ft_stage <stage> [hydra overrides...]
  local stage=$1; shift
  nemo_ft_srun -- -m "$NEMO_FT_STAGE_PKG.$stage" "$@"
  if [ -n "${DRY_RUN:-}" ]; then
    # The composed config, by the checkout's python when the stage's would run in a container.
    local py=$NEMO_FT_PY
    if [ -n "${NEMO_FT_CONTAINER:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
    "$py" -m "$NEMO_FT_STAGE_PKG.$stage" --cfg job "$@"
  fi
}
