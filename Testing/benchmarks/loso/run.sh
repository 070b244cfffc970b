#!/usr/bin/env bash
# Leave-one-subject-out on the brain MRs (issue 12), and every stack on every pair (an anatomy never seen included).
# Trains the two folds side by side (one thread each, about 30 min on 2 cores), makes the hold-out deformations of
# ../shared/data/make_pairs.py (new, stronger deformations and rotations of the MNI and brain2; the hold-out CT
# patient is not in ../shared/data), then evaluates one shot and accurate mode with `dlir evaluate` and prints the
# table of RESULTS.md ("Stacks on subjects they never saw").
#   Testing/benchmarks/loso/run.sh [OUT]      (default out/loso; a fold already trained is not trained again)
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=Testing/benchmarks/loso
out=${1:-out/loso}
data=$(cd ../shared/data && pwd)
mkdir -p "$out/eval"
out=$(cd "$out" && pwd)
repo=$(pwd)
for fold in brain1 mni; do
  name=brain-mri-without-$fold
  if [ ! -f "$out/$name/$name.safetensors" ]; then
    .venv/bin/dlir train --config $here/$name.toml --out "$out/$name" --threads 1 > "$out/$name.log" 2>&1 &
  fi
done
holdout=(mni_iso2mm_h mni_oblique_aniso_h brain2_aniso)
if [ ! -f "$out/holdout/pairs/brain2_aniso/landmarks.csv" ]; then
  (cd "$data" && "$repo/.venv/bin/python" make_pairs.py --data "$data" --out "$out/holdout" --set holdout --only "${holdout[@]}") > "$out/holdout.log"
fi
wait
# every pair with absolute paths: the development pairs of pairs.csv, then the hold-out deformations
{
  head -1 $here/pairs.csv
  tail -n +2 $here/pairs.csv | sed "s#\.\./\.\./\.\./\.\./shared/data#$data#g"
  for p in "${holdout[@]}"; do
    d=$(cd "$out/holdout/pairs/$p" && pwd)
    echo "$p,$d/fixed.nii.gz,$d/moving.nii.gz,$d/fixed_labels.nii.gz,$d/moving_labels.nii.gz,$d/landmarks.csv,$d/gt_displacement.nii.gz"
  done
} > "$out/pairs.csv"
evaluate() {  # NAME STACK [--refine auto]
  local name=$1 stack=$2; shift 2
  [ -f "$out/eval/$name/metrics.csv" ] || .venv/bin/dlir evaluate --pairs "$out/pairs.csv" --stack "$stack" --out "$out/eval/$name" --no-plots "$@" > "$out/eval/$name.log"
}
evaluate brain-mri Resources/Models/brain-mri.safetensors
evaluate chest-ct Resources/Models/chest-ct.safetensors
for fold in brain1 mni; do
  evaluate without-$fold "$out/brain-mri-without-$fold/brain-mri-without-$fold.safetensors"
  evaluate without-$fold-accurate "$out/brain-mri-without-$fold/brain-mri-without-$fold.safetensors" --refine auto
done
.venv/bin/python $here/table.py "$out/eval" brain-mri chest-ct without-brain1 without-mni without-brain1-accurate without-mni-accurate
