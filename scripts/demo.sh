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
# the final model: the last checkpoint, the EMA average of the run's last ~200 steps (callbacks=ema), a rule
# fixed before training that the reported splits choose nothing in (docs/heads.md, "Choosing the final model")
ckpt="$run/checkpoints/last.ckpt"
echo "demo: trained $run, predicting with $ckpt"

"$py" predict.py ckpt="$ckpt" input="$data/test" output="$run/predictions/test"
"$py" predict.py ckpt="$ckpt" input="$data/validation" output="$run/predictions/validation"

"$cli" evaluate pred="$run/predictions/validation" gt="$data/validation" out="$run/evaluation/validation"
"$cli" evaluate pred="$run/predictions/test" gt="$data/test_labels" out="$run/evaluation/test"
echo "demo: masks and subtype_results.csv in $run/predictions/, scores in $run/evaluation/*/summary.json"
