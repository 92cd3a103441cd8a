#!/usr/bin/env bash
# The whole tiny pipeline on CPU, in pipeline order, everything under $1 (default runs/demo).
# Each stage is the same command a user types; later stages join here as they land.
set -euo pipefail
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
rm -rf "$OUT"
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ -f nemo_ft/stages/prep.py ]; then
  say "prep: validate, normalize, dedup, split the shipped sample data -> $OUT/prep"
  $PY -m nemo_ft.stages.prep out_dir="$OUT/prep" "template.prompt_template='{input}{output}'" \
    'inputs=[{path: data/sample/sft_train.jsonl, weight: 0.857}, {path: data/sample/sft_validation.jsonl, weight: 0.143}]' \
    split.train=0.8 split.validation=0.15 split.test=0.05 seq_length=128  # the tiny model's context
  TRAIN="$OUT/prep/train.jsonl"; VAL="$OUT/prep/validation.jsonl"
else
  TRAIN=data/sample/sft_train.jsonl; VAL=data/sample/sft_validation.jsonl
fi

say "sft: LoRA on the tiny Llama base (data/tiny/tiny_llama.nemo), TP=1 on CPU -> $OUT/sft"
$PY -m nemo_ft.stages.sft run.dir="$OUT/sft" trainer.max_steps=120 trainer.val_check_interval=20 \
  trainer.enable_progress_bar=false \
  "model.data.train_ds.file_names=[$TRAIN]" "model.data.validation_ds.file_names=[$VAL]" \
  2>&1 | grep -E '^\[nemo-ft|error|Error' || { echo "sft failed; see $OUT/sft/nemo/nemo_log_globalrank-0_localrank-0.txt"; exit 1; }

say "export: TP=1 .nemo, HF base + HF-PEFT, merged, NIM/vLLM/Triton layouts -> $OUT/export"
$PY -m nemo_ft.stages.export from_run="$OUT/sft" out_dir="$OUT/export" merge=true \
  2>&1 | grep -E '^\[nemo-ft|error|Error' || { echo "export failed"; exit 1; }

say "done"
echo "  adapter:        $OUT/sft/adapter.nemo"
echo "  loss curves:    $OUT/sft/loss.png   (TensorBoard: tensorboard --logdir $OUT/sft/nemo)"
echo "  export:         $OUT/export/{adapter_tp1.nemo,hf_base,hf_peft,merged,nim}  (how to serve: $OUT/export/serving.md)"
echo "  manifests:      $OUT/*/manifest.json"
