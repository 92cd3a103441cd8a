#!/usr/bin/env bash
# The whole pipeline as dependent SLURM jobs: prep -> sft -> dpo -> export -> eval (and prep_dpo, the
# preference data, beside prep: dpo waits for sft and prep_dpo). Each job starts only if the ones it
# reads succeeded (--dependency=afterok) and reads their run directories (their manifests) as input.
# A stage joins when nemo_ft/stages/<stage>.py exists.
#   slurm/pipeline.sh [OUT] [STAGE:KEY=VALUE ...]
#   slurm/pipeline.sh runs/pipe sft:model=llama3_8b sft:parallel=tp2 sft:model.restore_from_path=/m/l3.nemo
#   DRY_RUN=1 slurm/pipeline.sh runs/pipe    # every sbatch and srun line, each stage's config; submits nothing
# STAGE:KEY=VALUE is a Hydra override for that stage's job (after the defaults below, so it wins); each
# stage writes OUT/<stage>, where the next one reads it (so leave run.dir / out_dir alone).
# sbatch options: NEMO_FT_SBATCH for every job, NEMO_FT_SBATCH_<STAGE> for one
# (NEMO_FT_SBATCH_SFT="--nodes=2 --ntasks-per-node=8 --gpus-per-node=8"); not SBATCH_*, which sbatch
# reads itself (SBATCH_EXPORT is its --export).
# Without OUT: runs/pipeline/<date-time>. Job logs: OUT/logs/<stage>-<job id>.out.
# A failed job cancels every job after it (--kill-on-invalid-dep=yes: CANCELLED, reason
# DependencyNeverSatisfied, nothing written); eval's failed gates (exit 3) fail the last job.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/pipeline/$(date +%Y%m%d-%H%M%S)
if [ $# -gt 0 ] && [[ $1 != *:*=* ]]; then out=$1; shift; fi
OUT=$(realpath -m "$out")
ALL="prep prep_dpo sft dpo export eval"

declare -A extra=()
for arg in "$@"; do
  stage=${arg%%:*}
  if [[ $arg != *:*=* ]] || [[ " $ALL " != *" $stage "* ]]; then
    echo "slurm/pipeline.sh: $arg: expected STAGE:KEY=VALUE with STAGE one of $ALL" >&2
    exit 2
  fi
  extra[$stage]+="${arg#*:}"$'\n'
done

have() { [ -f "nemo_ft/stages/$1.py" ]; }
# Each stage: its script, the stages it reads (and so waits for), and its defaults: scripts/demo.sh's
# tiny pipeline (the learnable lookup task, held-out = unseen pairings, a general share for eval's
# forgetting gate; preferences on the same prompts for dpo).
declare -A script=([prep]=slurm/prep.sh [prep_dpo]=slurm/prep.sh [sft]=slurm/sft_lora.sh
                   [dpo]=slurm/dpo_lora.sh [export]=slurm/export.sh [eval]=slurm/eval.sh)
declare -A after=([sft]=prep [dpo]="sft prep_dpo" [export]=sft [eval]=export)
declare -A args
args[prep]="out_dir=$OUT/prep
template.prompt_template='{input}{output}'
progress=false
inputs=[{path: data/sample/lookup_train.jsonl, weight: 0.8, split: train}, {path: data/sample/lookup_validation.jsonl, split: validation}, {path: data/sample/lookup_test.jsonl, split: test}, {path: data/sample/sft_train.jsonl, weight: 0.2, general: true}]
split.train=0.7
split.validation=0.15
split.test=0.15
seq_length=128"
# sft finds prep's files by prep's contract (OUT/prep/<split>.jsonl) and checks them against prep's
# manifest (sha256, tokenizer, template) before it starts; the later stages read from_run=/data_dir=.
args[sft]="run.dir=$OUT/sft
model.data.train_ds.file_names=[$OUT/prep/train.jsonl]
model.data.validation_ds.file_names=[$OUT/prep/validation.jsonl]
trainer.max_steps=200
trainer.val_check_interval=50
trainer.enable_progress_bar=false
model.peft.lora_tuning.target_modules=[all]
model.peft.lora_tuning.adapter_dim=16
model.optim.lr=3e-3"
stages=(prep sft)
if have dpo; then
  stages=(prep prep_dpo sft dpo)
  args[prep_dpo]="task=dpo
out_dir=$OUT/prep_dpo
progress=false
seq_length=128
inputs=[{path: data/sample/lookup_pref_train.jsonl, split: train}, {path: data/sample/lookup_pref_validation.jsonl, split: validation}, {path: data/sample/lookup_pref_test.jsonl, split: test}]"
  # The SFT adapter is merged into the base first: the reference policy is the SFT model.
  args[dpo]="run.dir=$OUT/dpo
from_run=$OUT/sft
data_dir=$OUT/prep_dpo
trainer.enable_progress_bar=false
trainer.dpo.max_steps=30
trainer.dpo.val_check_interval=10
model.dpo.sft_loss_weight=1.0
model.optim.lr=5e-4"
  after[export]=dpo
fi
stages+=(export)
args[export]="from_run=$OUT/${after[export]}
out_dir=$OUT/export"
if have eval; then
  stages+=(eval)
  args[eval]="from_run=$OUT/export
out_dir=$OUT/eval"
  # After dpo, eval's base is the SFT model (merged): no loss gain over it is owed.
  if have dpo; then args[eval]+=$'\n'"eval.gates.min_loss_improvement=null"; fi
fi

[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT/logs"
echo "[nemo-ft pipeline] ${stages[*]} -> $OUT${DRY_RUN:+ (DRY_RUN: nothing is submitted)}"
declare -A ids
for stage in "${stages[@]}"; do
  mapfile -t stage_args < <(printf '%s' "${args[$stage]}"$'\n'"${extra[$stage]:-}" | sed '/^$/d')
  var=NEMO_FT_SBATCH_${stage^^}
  # shellcheck disable=SC2206  # NEMO_FT_SBATCH[_<STAGE>] are lists of options, split on spaces
  opts=(--parsable --job-name="nemo-ft-$stage" --output="$OUT/logs/$stage-%j.out" --open-mode=append
        ${NEMO_FT_SBATCH:-} ${!var:-})
  if [ -n "${after[$stage]:-}" ]; then
    dep=afterok
    for up in ${after[$stage]}; do dep+=":${ids[$up]}"; done
    opts+=(--dependency="$dep" --kill-on-invalid-dep=yes)
  fi
  cmd=(sbatch "${opts[@]}" "${script[$stage]}" "${stage_args[@]}")
  if [ -n "${DRY_RUN:-}" ]; then
    echo
    echo "== $stage"
    printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
    DRY_RUN=1 bash "${script[$stage]}" "${stage_args[@]}"
    ids[$stage]="<$stage job id>"
    continue
  fi
  id=$("${cmd[@]}")
  ids[$stage]=${id%%;*}
  case $stage in
    sft|dpo) where=$(printf '%s\n' "${stage_args[@]}" | sed -n 's/^run\.dir=//p' | tail -n1) ;;
    *) where=$(printf '%s\n' "${stage_args[@]}" | sed -n 's/^out_dir=//p' | tail -n1) ;;
  esac
  echo "[nemo-ft pipeline] $stage: job ${ids[$stage]} -> $where (log $OUT/logs/$stage-${ids[$stage]}.out)"
done
[ -n "${DRY_RUN:-}" ] || echo "[nemo-ft pipeline] jobs: $(for s in "${stages[@]}"; do printf '%s=%s ' "$s" "${ids[$s]}"; done)"
