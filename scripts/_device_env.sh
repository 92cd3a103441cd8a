# shellcheck shell=bash
# Sourced by the scripts/gpu_*.sh device checks: PY, thread settings, and (WHEELS=1, on a bare lent
# machine) the carried .whl/ wheels installed once into /tmp/site and put on PYTHONPATH.
PY=${PY:-python3}
if [ "${WHEELS:-0}" = 1 ]; then
  [ -d /tmp/site/nemo ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.whl/mc:$PWD/.whl/stubs:$PWD
fi
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
