#!/usr/bin/env bash
# GPU smoke: the same `nemo-ft sft` stage on one GPU in bf16 (parallel=debug_1gpu), then tokens/s.
#   bash scripts/gpu_smoke.sh [RUN_DIR] [extra hydra overrides...]
# Env: PY (python with the stack, default python3), STEPS (default 200), PARALLEL (default debug_1gpu;
# PARALLEL=cpu runs the same script on a CPU to check it). Prints loss first -> last and throughput
# measured over the steps after the first 20 (warm-up: CUDA context, kernels, dataset index build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RUN_DIR=${1:-runs/gpu_smoke}; shift || true
STEPS=${STEPS:-200}
PARALLEL=${PARALLEL:-debug_1gpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
if [ "$PARALLEL" != cpu ]; then nvidia-smi -L || { echo "no GPU visible" >&2; exit 1; }; fi
rm -rf "$RUN_DIR"
$PY -m nemo_ft.stages.sft parallel="$PARALLEL" run.dir="$RUN_DIR" trainer.max_steps="$STEPS" \
  trainer.val_check_interval=100 trainer.enable_progress_bar=false \
  model.micro_batch_size=8 model.global_batch_size=8 "$@" 2>&1 | grep -E '^\[nemo-ft|Error|error:' || true
test -f "$RUN_DIR/manifest.json" || { echo "sft did not finish; log: $RUN_DIR/nemo/nemo_log_globalrank-0_localrank-0.txt" >&2;
  tail -50 "$RUN_DIR"/nemo/nemo_log_globalrank-0_localrank-0.txt >&2 || true; exit 1; }
$PY - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
import sentencepiece as spm
run = Path(sys.argv[1])
m = json.loads((run / "manifest.json").read_text())
cfg, s = m["config"], m["summary"]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r["kind"] == "train"]
# Non-padding tokens per example in the training data, with the tokenizer the data was cut for.
sp = spm.SentencePieceProcessor(model_file=str(Path("data/tiny/tokenizer.model")))
lengths = []
for f in cfg["model"]["data"]["train_ds"]["file_names"]:
    for line in open(f):
        r = json.loads(line)
        lengths.append(len(sp.encode(r["input"] + r["output"])) + 1)  # + EOS
per_example = sum(lengths) / len(lengths)
warm = [r for r in train if r["step"] > 20]
seconds = warm[-1]["time_s"] - warm[0]["time_s"]
examples = (warm[-1]["step"] - warm[0]["step"]) * cfg["model"]["global_batch_size"]
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and cfg["trainer"]["accelerator"] == "gpu" else "cpu"
print(f"[gpu_smoke] device: {device}; precision: {cfg['trainer']['precision']}; steps: {s['steps']}")
print(f"[gpu_smoke] train loss {s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f}; "
      f"val {s['val_loss_first']:.3f} -> {s['val_loss_last']:.3f}")
print(f"[gpu_smoke] {examples / seconds:.1f} examples/s, {examples * per_example / seconds:.0f} tokens/s "
      f"(non-padding, {per_example:.1f} tokens/example), {(warm[-1]['step'] - warm[0]['step']) / seconds:.1f} steps/s")
PY
