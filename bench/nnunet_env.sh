#!/usr/bin/env bash
# Create .venv-nnunet: nnU-Net v2 (nnunetv2 2.8.1) beside the same torch as .venv, for
# bench/train_throughput.py's nnU-Net rows (idempotent).
#
# A plain `pip install nnunetv2` after torch 2.13.0 replaces torch: dynamic-network-architectures
# requires timm, timm requires torchvision, and the newest torchvision pip may take (0.29.1) pins
# torch 2.14.1, a CUDA build with ~3 GB of nvidia-* wheels and triton (checked with --dry-run).
# PyPI's torchvision for 2.13.0 does not import beside the local CPU wheel either. Only
# dynamic-network-architectures' Primus/EVA networks import timm; nnU-Net's trainer, its ResEnc UNet
# and its losses do not. So nnunetv2 and dynamic-network-architectures go in with --no-deps and
# their other dependencies are listed here, with torch pinned by a constraint so nothing moves it.
#
#   bench/nnunet_env.sh
#
# Environment: PYTHON (default python3), NNUNET_VENV (default .venv-nnunet), TORCH_VERSION (default:
# the torch version of .venv without its local label, else 2.13.0; on a CUDA machine pip then takes
# its usual CUDA build of that version), NNUNETV2_VERSION (default 2.8.1).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
venv="${NNUNET_VENV:-.venv-nnunet}"
nnunet_version="${NNUNETV2_VERSION:-2.8.1}"
if [ -z "${TORCH_VERSION:-}" ] && [ -x .venv/bin/python ]; then
    TORCH_VERSION="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null \
        || true)"
fi
torch_version="${TORCH_VERSION:-2.13.0}"
stamp="$venv/.installed-nnunetv2-$nnunet_version-torch-$torch_version"

if [ -f "$stamp" ]; then
    echo "nnunet_env: $venv is ready (nnunetv2 $nnunet_version, torch $torch_version)"
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# the venv ignores itself, whatever the repository's .gitignore says
echo '*' > "$venv/.gitignore"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
constraints="$venv/torch-constraint.txt"
echo "torch==$torch_version" > "$constraints"

echo "nnunet_env: torch==$torch_version into $venv"
"${pip[@]}" install -q -c "$constraints" "torch==$torch_version"

echo "nnunet_env: nnunetv2==$nnunet_version and dynamic-network-architectures without timm/torchvision"
"${pip[@]}" install -q --no-deps "nnunetv2==$nnunet_version" "dynamic-network-architectures>=0.4.4,<0.5"
# nnunetv2 2.8.1's declared dependencies, less dynamic-network-architectures (installed above)
"${pip[@]}" install -q -c "$constraints" \
    "acvl-utils>=0.2.6,<0.3" tqdm scipy "batchgenerators>=0.25.1" "numpy>=1.24" scikit-learn \
    "scikit-image>=0.19.3" "SimpleITK>=2.2.1" pandas graphviz tifffile requests nibabel matplotlib \
    seaborn imagecodecs yacs "batchgeneratorsv2>=0.3.2" einops "blosc2>=3.3.2"

"$venv/bin/python" - <<'EOF'
import torch
import nnunetv2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet  # noqa: F401
from importlib.metadata import version
print(f"nnunet_env: ok: nnunetv2 {version('nnunetv2')}, dynamic-network-architectures "
      f"{version('dynamic-network-architectures')}, torch {torch.__version__}")
EOF
touch "$stamp"
