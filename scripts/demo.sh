#!/usr/bin/env bash
# The main job on the built-in synthetic data: train the CPU demo, predict the test split and the
# validation split, and evaluate both against the reference (make demo runs this after set-up).
# Extra arguments go to train.py, e.g. scripts/demo.sh trainer.max_epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VENV:-.venv}/bin/python"
cli="${VENV:-.venv}/bin/pancreas-mtl"
outputs="${PANCREAS_MTL_OUTPUTS:-outputs}"
data="$outputs/data/synthetic_default"

"$py" train.py experiment=cpu_demo "$@"
run=$(ls -td "$outputs"/runs/cpu_demo/*/ | head -n 1)
run=${run%/}
# the checkpoint the inner validation split chose (data.inner_validation), else the last one
ckpt=$(ls "$run"/checkpoints/epoch*-select*.ckpt 2>/dev/null | tail -n 1)
ckpt=${ckpt:-$run/checkpoints/last.ckpt}
echo "demo: trained $run, predicting with $ckpt"

"$py" predict.py ckpt="$ckpt" input="$data/test" output="$run/predictions/test"
"$py" predict.py ckpt="$ckpt" input="$data/validation" output="$run/predictions/validation"

"$cli" evaluate pred="$run/predictions/validation" gt="$data/validation" out="$run/evaluation/validation"
"$cli" evaluate pred="$run/predictions/test" gt="$data/test_labels" out="$run/evaluation/test"
echo "demo: masks and subtype_results.csv in $run/predictions/, scores in $run/evaluation/*/summary.json"
