#!/usr/bin/env bash
# hvd_ba's prepared GPU check: every GPU figure the README needs, in one JSON, in a few minutes on
# one GPU. Needs only torch and torchvision (no Horovod, no PyYAML, no internet; another torch
# version is fine): it runs the project from this checkout.
#
#   bash cluster/gpu_check.sh [OUT.json]      # default: $OUT/gpu_check.json, else ./gpu_check.json
#
# Parts (hvd_ba/bench/gpu_check.py): ResNet-50 training steps through the real engine in bf16 and fp16
# (GradScaler) with channels_last; device crops against loader crops; a checkpoint written and
# resumed on the device (same next-step loss, CUDA RNG included); bench gpu at M = 1, 4, 8 with
# loader and device augmentation (workers capped by /dev/shm). Without CUDA: a reduced form.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
DEST=${1:-${OUT:+$OUT/gpu_check.json}}
DEST=${DEST:-gpu_check.json}
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac   # where the user ran it, not the checkout
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout "${HVD_BA_GPU_CHECK_TIMEOUT:-470}" "$PY" -m hvd_ba.bench.gpu_check --out "$DEST"
