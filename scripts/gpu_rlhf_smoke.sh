#!/usr/bin/env bash
# GPU smoke for the Aligner stages that have not met a GPU yet: SFT -> reward model -> REINFORCE (rule
# reward) -> PPO (critic + reward model server), each the same stage as on a CPU, on one GPU in bf16
# (parallel=debug_1gpu). Not run by the tests (no GPU on dev/CI machines).
#   bash scripts/gpu_rlhf_smoke.sh [OUT_DIR]
# Env: PY (python with the stack, default python3), PARALLEL (default debug_1gpu; PARALLEL=cpu runs the
# same script on a CPU to check it), STEPS (RLHF steps, default 10).
# Prints each stage's summary line and, per RLHF stage, the reward first -> last and the server's
# ready/stop times; exits non-zero at the first stage that fails (its log tail on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${1:-runs/gpu_rlhf_smoke}
PARALLEL=${PARALLEL:-debug_1gpu}
STEPS=${STEPS:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
if [ "$PARALLEL" != cpu ]; then nvidia-smi -L || { echo "no GPU visible" >&2; exit 1; }; fi
rm -rf "$OUT"; mkdir -p "$OUT"
stage() {  # stage <name> <log> args...: run one stage, keep its log, show its own lines
  local name=$1 log=$2; shift 2
  if ! $PY -m "nemo_ft.stages.$name" "$@" > "$log" 2>&1; then
    echo "[gpu_rlhf_smoke] $name failed; the end of $log:" >&2; tail -40 "$log" >&2; exit 1
  fi
  grep -E '^\[nemo-ft' "$log" || true
}
LOOKUP="{path: data/sample/lookup_train.jsonl, split: train}, {path: data/sample/lookup_validation.jsonl, split: validation}, {path: data/sample/lookup_test.jsonl, split: test}"
PREFS="{path: data/sample/lookup_pref_train.jsonl, split: train}, {path: data/sample/lookup_pref_validation.jsonl, split: validation}, {path: data/sample/lookup_pref_test.jsonl, split: test}"
stage prep "$OUT/prep.log" out_dir="$OUT/prep" "template.prompt_template='{input}{output}'" progress=false \
  "inputs=[$LOOKUP]" seq_length=128
stage prep "$OUT/prep_rlhf.log" task=rlhf out_dir="$OUT/prep_rlhf" "template.prompt_template='{input}{output}'" \
  progress=false "inputs=[$LOOKUP]" seq_length=128
stage prep "$OUT/prep_rm.log" task=rm out_dir="$OUT/prep_rm" progress=false "inputs=[$PREFS]" seq_length=128
stage sft "$OUT/sft.log" parallel="$PARALLEL" run.dir="$OUT/sft" trainer.max_steps=200 trainer.val_check_interval=50 \
  trainer.enable_progress_bar=false 'model.peft.lora_tuning.target_modules=[all]' model.peft.lora_tuning.adapter_dim=16 \
  model.optim.lr=3e-3 "model.data.train_ds.file_names=[$OUT/prep/train.jsonl]" \
  "model.data.validation_ds.file_names=[$OUT/prep/validation.jsonl]"
stage rm "$OUT/rm.log" parallel="$PARALLEL" data_dir="$OUT/prep_rm" run.dir="$OUT/rm" trainer.rm.max_steps=40 \
  trainer.rm.val_check_interval=10 model.global_batch_size=4
stage reinforce "$OUT/reinforce.log" parallel="$PARALLEL" from_run="$OUT/sft" data_dir="$OUT/prep_rlhf" \
  run.dir="$OUT/reinforce" reward.kind=rule trainer.reinforce.max_steps="$STEPS" trainer.reinforce.val_check_interval=5 \
  model.global_batch_size=16
stage ppo "$OUT/ppo.log" parallel="$PARALLEL" from_run="$OUT/sft" data_dir="$OUT/prep_rlhf" run.dir="$OUT/ppo" \
  reward.from_run="$OUT/rm" trainer.ppo.max_steps="$STEPS" trainer.ppo.val_check_interval=5 model.global_batch_size=8
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("reinforce", "ppo"):
    s = json.loads((Path(sys.argv[1]) / name / "manifest.json").read_text())["summary"]
    print(f"[gpu_rlhf_smoke] {name}: reward {s['rewards_first']:.3f} -> {s['rewards_last']:.3f}; server ready "
          f"{s['server']['ready_s']} s, stopped {s['server']['stop'].get('stop_s')} s, left {s['server']['stop'].get('left')}"
          + (f"; critic loss {s['critic']['loss_first']:.3f} -> {s['critic']['loss_last']:.3f}" if "critic" in s else ""))
PY
