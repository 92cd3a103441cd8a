#!/usr/bin/env bash
# Build the image and smoke it, where Docker and an NVIDIA GPU are (CI cannot build it):
#   bash containers/smoke.sh [TAG]        default TAG nemo-ft:dev; BASE=nvcr.io/nvidia/nemo:YY.MM to try a base
# 1. docker build: the Dockerfile itself fails if the image's NeMo / megatron-core drift from our pins;
# 2. `nemo-ft sft --cfg job`: the config layer composes inside the image;
# 3. `nemo-ft plan`: the memory planner on its default profile;
# 4. the GPU smoke (scripts/gpu_smoke.sh): LoRA SFT of the tiny base in bf16 on one GPU, loss and tokens/s.
# Then, for SLURM + pyxis: containers/README.md (enroot import, NEMO_FT_CONTAINER).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-nemo-ft:dev}
build=(docker build -f containers/Dockerfile -t "$TAG")
if [ -n "${BASE:-}" ]; then build+=(--build-arg "BASE=$BASE"); fi
"${build[@]}" .
run() { docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 "$TAG" "$@"; }
run nemo-ft sft --cfg job > /dev/null
echo "ok: nemo-ft sft --cfg job"
run nemo-ft plan
echo "ok: nemo-ft plan"
run bash scripts/gpu_smoke.sh /tmp/gpu_smoke
echo "ok: GPU smoke in $TAG"
