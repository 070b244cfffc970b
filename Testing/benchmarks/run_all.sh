#!/usr/bin/env bash
# DLIR against elastix on every ../shared/data pair, on demand (not part of CI).
#
#   Testing/benchmarks/run_all.sh                       # untrained dev stack (identity networks)
#   Testing/benchmarks/run_all.sh 'lung*=chest-ct' 'brain-mri'   # trained stacks, chosen by pair id
#
# Environment: DATA (default ../shared/data), OUT (default out/bench), REFINE (default auto: accurate mode),
# REPEATS (timed runs of each DLIR and each elastix registration, default "3 2").
# Needs itk-elastix==0.25.4 and matplotlib (pip install -e ".[bench]").  Writes OUT/bench.txt
# (the printed tables), OUT/bench.md, OUT/summary.md, OUT/metrics.csv, plots and panels.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/bench}
REFINE=${REFINE:-auto}
REPEATS=${REPEATS:-3 2}
mkdir -p "$OUT"
stacks=("$@")
if [ ${#stacks[@]} -eq 0 ]; then
    stacks=("$(.venv/bin/python Testing/benchmarks/make_dev_stack.py "$OUT/dev-untrained.safetensors")")
fi
stack_args=()
for s in "${stacks[@]}"; do stack_args+=(--stack "$s"); done
.venv/bin/dlir bench --pairs "$DATA/pairs" "${stack_args[@]}" --refine "$REFINE" --repeats $REPEATS \
    --scaling-pair mni_iso2mm \
    --out "$OUT" | tee "$OUT/bench.txt"
