"""Device settings shared by training and prediction."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise torch's device of that name."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_tf32(enabled: bool | None) -> None:
    """TF32 for float32 matmuls and convolutions on Ampere+ GPUs (None: leave torch's setting).

    Uses torch's legacy switches on purpose: Lightning reads ``torch.get_float32_matmul_precision()``, which
    raises once the newer ``fp32_precision`` API has been mixed in.
    """
    if enabled is None:
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = bool(enabled)
