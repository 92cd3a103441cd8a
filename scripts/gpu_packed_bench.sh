#!/usr/bin/env bash
# Packed vs padded on a lent GPU (device tool): two sizes of the same benchmark, one shared base.
#   bash scripts/gpu_packed_bench.sh OUT_DIR
# Runs where the stack is importable as `python3` (PY overrides); on a bare lent machine pass
# WHEELS=1 to install the carried .whl/ wheels into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?out dir}; mkdir -p "$OUT"
. scripts/_device_env.sh
BASE=$(mktemp -d)/base
# 1) the configuration measured before the RoPE fix (0.96x): pack 1024 vs 8 padded rows
timeout 270 "$PY" benchmarks/packed_vs_padded.py --parallel debug_1gpu --hidden 2048 --layers 8 \
  --pack 1024 --mbs 8 --steps 60 --base-dir "$BASE" --out "$OUT/packed_vs_padded_h2048_pack1024.md" | tail -4
# 2) more work per step: pack 4096 vs 32 padded rows
timeout 200 "$PY" benchmarks/packed_vs_padded.py --parallel debug_1gpu --hidden 2048 --layers 8 \
  --rows 3200 --pack 4096 --mbs 32 --steps 40 --base-dir "$BASE" --out "$OUT/packed_vs_padded_h2048_pack4096.md" | tail -4
