#!/usr/bin/env bash
# Create the project's virtual environment and install pancreas_mtl into it (idempotent).
#
# On a machine without CUDA the CPU build of torch is installed first, pinned, from PyTorch's CPU wheel
# index (the default index serves a multi-GB CUDA build even for a pin), falling back to the default
# index where the CPU index cannot be reached; nothing later pulls a CUDA build through torch's open
# version range. Machines with CUDA get pip's usual torch build.
#
#   scripts/setup.sh            runtime dependencies (plus the cpu extra, OpenVINO and ONNX Runtime, without CUDA)
#   scripts/setup.sh dev        plus the test dependencies and the cpu extra
#
# Environment: PYTHON (interpreter, default python3), VENV (default .venv),
# TORCH_CPU_VERSION (default 2.13.0), TORCH_INDEX_URL (forces the index for the CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
torch_cpu_version="${TORCH_CPU_VERSION:-2.13.0}"
stamp="$venv/.installed${extras:+-$extras}"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: no CUDA on this machine, installing the CPU build torch==$torch_cpu_version first"
    # PyTorch's CPU wheel index when it answers, else the default index (scripts/torch_source.py)
    torch_args=()
    while IFS= read -r arg; do torch_args+=("$arg"); done < <("$venv/bin/python" scripts/torch_source.py "$torch_cpu_version")
    "${pip[@]}" install -q "${torch_args[@]}"
fi

# the CPU inference engines (OpenVINO, ONNX Runtime: the cpu extra) where there is no CUDA, and for the
# tests, which run every engine
install_extras="$extras"
if ! command -v nvidia-smi >/dev/null 2>&1 || [ "$extras" = dev ]; then
    install_extras="${extras:+$extras,}cpu"
fi
target="."
[ -n "$install_extras" ] && target=".[$install_extras]"
echo "setup: installing pancreas_mtl ($target) into $venv"
"${pip[@]}" install -q -e "$target"
if [ "$extras" = dev ]; then
    # nnU-Net's network package, for the weight-parity tests only. Its declared dependencies pull
    # timm, torchvision and a newer CUDA torch; the ResEnc UNet imports without them.
    "${pip[@]}" install -q --no-deps "dynamic-network-architectures==0.4.4" "einops>=0.7"
fi
touch "$stamp"
