#!/usr/bin/env bash
# Accurate mode (dlir register --refine auto) against one shot, elastix and ANTs SyN, on demand (not CI).
#
#   Testing/benchmarks/accurate.sh            # about 10 min on 2 idle cores
#
# Pairs: the four development pairs of ../shared/data/pairs (synthetic deformations of real images, exact
# ground truth) and the real inter-subject brain MR pair (brain2 -> brain1, head masks as labels), none of
# them used to train the bundled stacks' weights on these deformations.  Then the same on a busy machine:
# one core kept busy by another process, as inside Slicer, to compare how each method slows down.
# Environment: DATA (default ../shared/data), OUT (default out/bench-accurate), REPEATS (default "2 1").
# Needs the bench extra (pip install -e ".[bench]": itk-elastix, antspyx, matplotlib).  Writes
# OUT/idle/bench.txt and OUT/busy/bench.txt (the printed tables) with their bench.md, metrics.csv, panels.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/bench-accurate}
REPEATS=${REPEATS:-2 1}
DATA=$(cd "$DATA" && pwd)
mkdir -p "$OUT/pairs/brain_2to1"
for pair in "$DATA"/pairs/*/; do ln -sfn "$pair" "$OUT/pairs/$(basename "$pair")"; done
ln -sf "$DATA/brain_mr_tumor1/t1.nii.gz" "$OUT/pairs/brain_2to1/fixed.nii.gz"
ln -sf "$DATA/brain_mr_tumor2/t1.nii.gz" "$OUT/pairs/brain_2to1/moving.nii.gz"
ln -sf "$DATA/brain_mr_tumor1/head_mask.nii.gz" "$OUT/pairs/brain_2to1/fixed_labels.nii.gz"
ln -sf "$DATA/brain_mr_tumor2/head_mask.nii.gz" "$OUT/pairs/brain_2to1/moving_labels.nii.gz"

bench() {  # $1: output folder
    .venv/bin/dlir bench --pairs "$OUT/pairs" --stack 'lung*=chest-ct' --stack brain-mri --refine auto \
        --repeats $REPEATS --sizes --out "$1" | tee "$1.txt"
}
mkdir -p "$OUT/idle" "$OUT/busy"
bench "$OUT/idle"
.venv/bin/python -c "while True: pass" &  # one core busy
spinner=$!
trap 'kill $spinner 2>/dev/null' EXIT
bench "$OUT/busy"
