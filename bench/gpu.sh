#!/usr/bin/env bash
# GPU benchmark: the in-process limit and the backends at batch 64-512 on one CUDA device.
#
#   bench/gpu.sh                 # results in bench/results/gpu/
#   IMAGES=4096 BATCH_SIZES=128,256 bench/gpu.sh --compile
#
# Why only limit and backends: on a GPU the question is how fast one worker process can feed
# the device (decode threads vs forward) and which backend/precision to serve with; the
# queue-level figures are the same code as on CPU and are measured by `python -m bench.run`.
# Budget: under 5 minutes on one H200-class GPU (about 40 s of data and model set-up, then
# 4 batch sizes x (3 limit loops + 4 backends) x 3 repetitions over 2048 images).
# Exit status: 2 without a CUDA device, else the benchmark's own (0 ok, 1 a figure failed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
IMAGES="${IMAGES:-2048}"
BATCH_SIZES="${BATCH_SIZES:-64,128,256,512}"
OUT="${OUT:-bench/results/gpu}"
# A GPU worker decodes on the CPU; with 2 decode threads the limit is the decoder, not the GPU.
# Set it the way a GPU worker is configured (EMOTIONS_DECODE_THREADS in compose / .env).
export EMOTIONS_DECODE_THREADS="${EMOTIONS_DECODE_THREADS:-8}"

if ! "$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    print(
        "bench/gpu.sh: no CUDA device found (torch.cuda.is_available() is False); "
        "run the CPU benchmark instead: python -m bench.run --images 1000",
        file=sys.stderr,
    )
    sys.exit(2)
print(f"bench/gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
then
    exit 2
fi

started=$(date +%s)
status=0
"$PYTHON" -m bench.run \
    --device cuda \
    --only limit,backends \
    --images "$IMAGES" \
    --batch-sizes "$BATCH_SIZES" \
    --out "$OUT" \
    "$@" || status=$?
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s; report in $OUT/latest.md"
exit $status
