#!/usr/bin/env bash
# The GPU figures in one run of under 10 minutes, into one results file.
#
#   bench/gpu_suite.sh [RESULTS_FOLDER]        default: $OUT when set (the device machine), else bench/results
#
# Steps, each under its own time limit (a step that runs over is cut and noted, the others still run),
# all inside a budget of SUITE_BUDGET_S seconds (default 570):
#   machine    GPU, driver, torch and CUDA versions
#   train_*    training steps/s at the quiz plan (ResEnc M, 64 x 128 x 192, batch 2; bench/train_throughput.py):
#              ours bf16 autocast, fp32 with TF32, bf16 + torch.compile; nnU-Net v2's own trainer (fp16
#              autocast, eager and compiled) when .venv-nnunet (bench/nnunet_env.sh) imports nnunetv2,
#              else a note that the nnU-Net rows were skipped
#   predict    fast and accurate seconds per quiz-sized case, fp32 (TF32) / bf16 / fp16, with peak GPU
#              memory per case (bench/engine_speed.py --device cuda)
# Results: RESULTS_FOLDER/gpu_suite.md (markdown tables, for docs/benchmarks.md), each step's log beside it.
# Environment: PYTHON (default .venv/bin/python, else python3), NNUNET_PYTHON (default
# .venv-nnunet/bin/python), SUITE_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
nnunet_python="${NNUNET_PYTHON:-.venv-nnunet/bin/python}"
results_dir="${1:-${OUT:-bench/results}}"
budget="${SUITE_BUDGET_S:-570}"
start=$(date +%s)

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: no CUDA device visible to torch ($python): this suite measures GPU figures only;" \
         "run it on a machine with a GPU (CPU figures: bench/engine_speed.py, bench/train_throughput.py)" >&2
    exit 2
fi
mkdir -p "$results_dir"
results="$results_dir/gpu_suite.md"
{
    echo "# GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
} > "$results"

# step NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less when the budget is nearly
# spent), its stdout appended to the results under a heading, its stderr to NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    echo "## $name" >> "$results"
    if [ "$left" -lt 20 ]; then
        echo "(skipped: the suite's budget of ${budget} s is spent)" >> "$results"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "gpu_suite: $name (at most ${limit} s)" >&2
    timeout --kill-after=10 "$limit" "$@" >> "$results" 2> "$results_dir/$name.log"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "(cut after ${limit} s; $name.log)" >> "$results"
    elif [ $rc -ne 0 ]; then
        echo "(failed with exit $rc; $name.log: $(tail -n 1 "$results_dir/$name.log"))" >> "$results"
    fi
    echo >> "$results"
}

step machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    '$python' -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \
\"bf16\", torch.cuda.is_bf16_supported())'"

train=("$python" bench/train_throughput.py --device cuda --preset M --warmup 3 --steps 10)
step train_bf16 75 "${train[@]}" --variants bf16
step train_fp32_tf32 75 "${train[@]}" --variants fp32+tf32
step train_bf16_compile 150 "${train[@]}" --compile --variants bf16+compile
if [ -x "$nnunet_python" ] && "$nnunet_python" -c "import nnunetv2" 2>/dev/null; then
    step train_nnunet 75 "${train[@]}" --nnunet-python "$nnunet_python" --variants nnunet
    step train_nnunet_compile 150 "${train[@]}" --nnunet-python "$nnunet_python" --compile --variants nnunet+compile
else
    {
        echo "## train_nnunet"
        echo "(skipped: $nnunet_python does not import nnunetv2; bench/nnunet_env.sh makes it where PyPI is reachable)"
        echo
    } >> "$results"
fi
step predict 120 "$python" bench/engine_speed.py --device cuda --networks M --presets fast accurate --repeats 5

echo "total: $(($(date +%s) - start)) s of a ${budget} s budget" >> "$results"
echo "gpu_suite: results in $results" >&2
