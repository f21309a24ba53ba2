#!/usr/bin/env bash
# Reproduce llmc/assets/tiny_qwen2vl_mme from scratch: stage 0+1, then stage 2 with the outlier columns.
# About 20 minutes on 2 CPU cores; deterministic for a given seed and thread count (see docs/tiny_vlm.md).
#   tools/make_tiny_vlm.sh OUT [SEED]      (PYTHON=... to pick the interpreter)
set -euo pipefail
out=${1:?usage: tools/make_tiny_vlm.sh OUT [SEED]}
seed=${2:-0}
py=${PYTHON:-python}
if [ -e "$out" ]; then
    echo "make_tiny_vlm.sh: $out exists; give a new folder (nothing is overwritten)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" tools/train_tiny_vlm.py --out "$work/stage1" --seed "$seed" --threads 2 --eval-every 0 \
    --steps 3000 --vision-steps 300 --yn-warm 0.3 --yn-frac 0.5 --cmp-aux 0
"$py" tools/train_tiny_vlm.py --out "$out" --seed "$seed" --threads 2 --eval-every 0 \
    --init-from "$work/stage1" --vision-steps 0 --steps 2000 --yn-warm 0.4 --yn-frac 0.6 --warm-frac 0 \
    --aux-start 0.3 --aux-end 0.1 --lr 2e-3 --log-every 50 --outlier-scale 16 --outlier-channels 4
