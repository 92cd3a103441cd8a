#!/usr/bin/env bash
# Packed attention correctness on a lent GPU: each example's loss inside its pack vs alone, through
# the real NeMo model restored by the SFT stage's code (tests/e2e/packed_check.py), in both
# nemo_ft.runtime modes (mask: the CUDA default; loop), fp32.
#   bash scripts/gpu_packed_check.sh OUT_DIR        (WHEELS=1 on a bare lent machine, as gpu_packed_bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?out dir}; mkdir -p "$OUT"
. scripts/_device_env.sh
DATA=$(mktemp -d)
$PY -m nemo_ft.stages.prep input=data/sample/sft_train.jsonl out_dir="$DATA" "template.prompt_template='{input}{output}'" \
  pack=true seq_length=128 progress=false > /dev/null
for mode in mask loop; do
  NEMO_FT_PACKED_ATTENTION=$mode timeout 150 "$PY" tests/e2e/packed_check.py "$DATA/packed_128_seed0.npy" 3 \
    parallel=debug_1gpu 2> "$OUT/packed_check_$mode.log" | tail -1 > "$OUT/packed_check_$mode.json"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("packed_check_*.json")):
    r = json.loads(f.read_text())
    diffs = [abs(p - a) / max(abs(a), 1e-9) for a, p in zip(r["alone"], r["packed"])]
    leaks = sum(abs(a - l) > 0.5 for a, l in zip(r["alone"], r["leaky"]))
    print(f"{r['device']} {r['attention']}: {len(diffs)} examples, max rel |packed - alone| = {max(diffs):.2e}; "
          f"leaky path off by > 0.5 nats on {leaks}/{len(diffs)}")
PY
