#!/usr/bin/env bash
# Compare nemo-ft plan's memory prediction with torch.cuda.max_memory_allocated on one GPU.
# Usage: scripts/gpu_plan_check.sh [--dry-run]   (needs python3 with torch + CUDA, not NeMo;
# writes $OUT/plan_check.md when OUT is set; --dry-run prints predictions on any machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/scripts/gpu_plan_check.py" "$@"
