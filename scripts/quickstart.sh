#!/usr/bin/env bash
# The quick start on a fresh machine: set up, fetch MNIST, train a narrow CapsNet for four epochs
# on the CPU (under 10 minutes on 2 cores, set-up included; on a GPU torch uses it), then draw its
# figures. Width, epochs, batch size and learning-rate schedule were chosen by measurement on the
# validation split (docs/performance.md, "The quick start's settings").
#
#   scripts/quickstart.sh            (or: make quickstart)
#
# Run it again: a finished run is not trained twice (its figures are redrawn); an interrupted one
# is resumed. QUICKSTART_OUT chooses the output folder (default runs/quickstart); CAPSSPEC_VENV
# and PYTHON choose the environment (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
capsspec_setup "train,torch" "torch==2.13.0"

out="${QUICKSTART_OUT:-runs/quickstart}"
if [ -f "$out/summary.json" ]; then
    echo "capsspec: $out already holds a finished run; drawing its figures (delete $out to train again)" >&2
elif [ -f "$out/checkpoint.safetensors" ]; then
    capsspec train --resume --out "$out"
else
    capsspec train --backend torch --epochs 4 --conv1-channels 32 --primary-types 8 \
        --batch-size 64 --lr 0.002 --lr-decay-rate 0.9 --lr-decay-steps 200 --out "$out"
fi
capsspec figures "$out/final.safetensors"
echo "capsspec: done. The run and its figures are in $out (summary.json, metrics.jsonl, *.png)."
