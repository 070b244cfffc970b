#!/usr/bin/env bash
# The inter-subject development set (issue 25) against elastix and ANTs: makes the set (make_set.py), then
# `dlir bench` with the bundled stacks (chest-ct for the CT capture cases, brain-mri for the MR pairs), one shot and
# accurate mode; the table is OUT/bench.md (Dice, folding and std det J inside the fixed labels, time, speed).
#   Testing/benchmarks/intersubject/run.sh [OUT]     (default out/intersubject; run it on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=${1:-out/intersubject}
.venv/bin/python Testing/benchmarks/intersubject/make_set.py --out "$out"
.venv/bin/dlir bench --pairs "$out/pairs.csv" --stack 'ct*=chest-ct' --stack brain-mri --refine auto --repeats 2 1 \
    --sizes --no-plots --out "$out/bench"
cat "$out/bench/bench.md"
