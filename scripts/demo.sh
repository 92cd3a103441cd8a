#!/usr/bin/env bash
# The whole tiny pipeline on CPU, in pipeline order, everything under $1 (default runs/demo).
# Each stage is the same command a user types; later stages join here as they land.
set -euo pipefail
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
rm -rf "$OUT"
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "prep: the lookup task (learnable, held-out = unseen pairings) + a general share -> $OUT/prep"
INPUTS="{path: data/sample/lookup_train.jsonl, weight: 0.8, split: train}"
INPUTS+=", {path: data/sample/lookup_validation.jsonl, split: validation}"
INPUTS+=", {path: data/sample/lookup_test.jsonl, split: test}"
INPUTS+=", {path: data/sample/sft_train.jsonl, weight: 0.2, general: true}"  # held-out share: eval's forgetting slice
$PY -m nemo_ft.stages.prep out_dir="$OUT/prep" "template.prompt_template='{input}{output}'" progress=false \
  "inputs=[$INPUTS]" split.train=0.7 split.validation=0.15 split.test=0.15 seq_length=128  # the tiny model's context

say "sft: LoRA on all four targets of the tiny Llama base (data/tiny/tiny_llama.nemo), TP=1 on CPU -> $OUT/sft"
$PY -m nemo_ft.stages.sft run.dir="$OUT/sft" trainer.max_steps=200 trainer.val_check_interval=50 \
  trainer.enable_progress_bar=false 'model.peft.lora_tuning.target_modules=[all]' \
  model.peft.lora_tuning.adapter_dim=16 model.optim.lr=3e-3 \
  "model.data.train_ds.file_names=[$OUT/prep/train.jsonl]" "model.data.validation_ds.file_names=[$OUT/prep/validation.jsonl]" \
  2>&1 | grep -E '^\[nemo-ft|error|Error' || { echo "sft failed; see $OUT/sft/nemo/nemo_log_globalrank-0_localrank-0.txt"; exit 1; }

say "export: TP=1 .nemo, HF base + HF-PEFT, merged, NIM/vLLM/Triton layouts -> $OUT/export"
$PY -m nemo_ft.stages.export from_run="$OUT/sft" out_dir="$OUT/export" merge=true \
  2>&1 | grep -E '^\[nemo-ft|error|Error' || { echo "export failed"; exit 1; }

say "eval: base vs adapter on the 40 held-out rows, gates -> $OUT/eval"
$PY -m nemo_ft.stages.eval from_run="$OUT/export" out_dir="$OUT/eval" \
  "eval.heldout='The 40 test rows pair names and towns that never appear together in training; every town was seen as an answer in training: held-out means unseen combinations of seen items, not unseen words.'" \
  2>&1 | grep -E '^\[nemo-ft|^nemo-ft|error|Error' || true
test -f "$OUT/eval/report.json" || { echo "eval failed"; exit 1; }

say "dpo: preferences on the same prompts (the asked-for town over the other field), from the SFT adapter -> $OUT/dpo"
$PY -m nemo_ft.stages.prep task=dpo out_dir="$OUT/prep_dpo" progress=false seq_length=128 \
  "inputs=[{path: data/sample/lookup_pref_train.jsonl, split: train}, {path: data/sample/lookup_pref_validation.jsonl, split: validation}, {path: data/sample/lookup_pref_test.jsonl, split: test}]"
# The SFT adapter is merged into the base first, so the reference policy is the SFT model; the SFT term
# (RPO-style) keeps the chosen answers likely while the rejected ones are pushed down.
$PY -m nemo_ft.stages.dpo from_run="$OUT/sft" data_dir="$OUT/prep_dpo" run.dir="$OUT/dpo" \
  trainer.dpo.max_steps=30 trainer.dpo.val_check_interval=10 model.dpo.sft_loss_weight=1.0 model.optim.lr=5e-4 \
  2>&1 | grep -E '^\[nemo-ft|^nemo-ft|error|Error' || { echo "dpo failed"; exit 1; }
$PY -m nemo_ft.stages.export from_run="$OUT/dpo" out_dir="$OUT/export_dpo" \
  2>&1 | grep -E '^\[nemo-ft export\] exported|error|Error' || { echo "export of the DPO adapter failed"; exit 1; }
# Against the SFT model (its base here): no loss gain is owed, the task must still be answered, no forgetting.
$PY -m nemo_ft.stages.eval from_run="$OUT/export_dpo" out_dir="$OUT/eval_dpo" eval.gates.min_loss_improvement=null \
  2>&1 | grep -E '^\[nemo-ft eval\] (dpo|base|PASS|FAIL)|^nemo-ft|error|Error' || true
test -f "$OUT/eval_dpo/report.json" || { echo "eval of the DPO adapter failed"; exit 1; }

say "rm: a reward model (full-parameter, NeMo-Aligner) on the same preferences -> $OUT/rm"
$PY -m nemo_ft.stages.prep task=rm out_dir="$OUT/prep_rm" progress=false seq_length=128 \
  "inputs=[{path: data/sample/lookup_pref_train.jsonl, split: train}, {path: data/sample/lookup_pref_validation.jsonl, split: validation}, {path: data/sample/lookup_pref_test.jsonl, split: test}]"
$PY -m nemo_ft.stages.rm data_dir="$OUT/prep_rm" run.dir="$OUT/rm" trainer.rm.max_steps=40 trainer.rm.val_check_interval=10 \
  2>&1 | grep -E '^\[nemo-ft|^nemo-ft|error|Error' || { echo "rm failed"; exit 1; }

say "reinforce: REINFORCE (RLOO) from the SFT adapter, scored by the demo's reward model -> $OUT/reinforce"
$PY -m nemo_ft.stages.prep task=rlhf out_dir="$OUT/prep_rlhf" progress=false seq_length=128 \
  "template.prompt_template='{input}{output}'" \
  "inputs=[{path: data/sample/lookup_train.jsonl, split: train}, {path: data/sample/lookup_validation.jsonl, split: validation}, {path: data/sample/lookup_test.jsonl, split: test}]"
# The stage starts `nemo-ft reward_server kind=rm` (Aligner's RewardModelServer around rm.nemo) on
# 127.0.0.1 itself, waits for it with a deadline and stops it on every exit path.
$PY -m nemo_ft.stages.reinforce from_run="$OUT/sft" data_dir="$OUT/prep_rlhf" run.dir="$OUT/reinforce" \
  reward.kind=rm reward.from_run="$OUT/rm" trainer.reinforce.max_steps=10 trainer.reinforce.val_check_interval=5 \
  2>&1 | grep -E '^\[nemo-ft|^nemo-ft|error|Error' || { echo "reinforce failed"; exit 1; }
$PY -m nemo_ft.stages.export from_run="$OUT/reinforce" out_dir="$OUT/export_reinforce" \
  2>&1 | grep -E '^\[nemo-ft export\] exported|error|Error' || { echo "export of the REINFORCE adapter failed"; exit 1; }

say "ppo: PPO from the SFT adapter, its critic initialized from (and serving) the reward model -> $OUT/ppo"
# The stage starts `nemo-ft critic_server` (Aligner's combined critic + reward model server) itself.
$PY -m nemo_ft.stages.ppo from_run="$OUT/sft" data_dir="$OUT/prep_rlhf" run.dir="$OUT/ppo" reward.from_run="$OUT/rm" \
  trainer.ppo.max_steps=10 trainer.ppo.val_check_interval=5 \
  2>&1 | grep -E '^\[nemo-ft|^nemo-ft|error|Error' || { echo "ppo failed"; exit 1; }

say "import: the exported hf_base/ back into a .nemo (what a team starting from HF weights runs) -> $OUT/import"
$PY -m nemo_ft.stages.import_hf hf="$OUT/export/hf_base" out="$OUT/import/base.nemo" run.dir="$OUT/import" profile=tiny \
  2>&1 | grep -E '^\[nemo-ft|error|Error' || { echo "import failed"; exit 1; }

say "done"
echo "  adapter:        $OUT/sft/adapter.nemo"
echo "  loss curves:    $OUT/sft/loss.png   (TensorBoard: tensorboard --logdir $OUT/sft/nemo)"
echo "  export:         $OUT/export/{adapter_tp1.nemo,hf_base,hf_peft,merged,nim}  (how to serve: $OUT/export/serving.md)"
echo "  eval:           $OUT/eval/report.md  ($OUT/eval/metrics.png: the verdict)"
echo "  dpo:            $OUT/dpo/dpo.png (loss, rewards, margin, accuracy); $OUT/eval_dpo/report.md"
echo "  reward model:   $OUT/rm/rm.nemo ($OUT/rm/rm.png)"
echo "  reinforce:      $OUT/reinforce/reinforce.png (reward, KL, ended, length); rollouts.jsonl; $OUT/export_reinforce"
echo "  ppo:            $OUT/ppo/ppo.png; the critic's own log and metrics: $OUT/ppo/critic_server/"
echo "  manifests:      $OUT/*/manifest.json"
