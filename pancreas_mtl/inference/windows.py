"""Where the sliding windows go over one case: their starts along each axis, how many a pass runs and
the cap on them, the mirror passes, and the Gaussian importance map that weighs each window's voxels.

Planning only, no network: :mod:`pancreas_mtl.inference.sliding_window` runs the network over these
windows, and the predictor counts them per case before the first forward pass. Every spatial triple is
(z, y, x).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pancreas_mtl.inference.settings import InferenceSettings


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125,
                            device: torch.device | str = "cpu", nnunet_compat: bool = False) -> Tensor:
    """(Z, Y, X) float32 weights: a Gaussian centred on the window with sigma ``sigma_scale`` x its size
    per axis, maximum 1, with values that underflow to 0 raised to the smallest positive one (nnU-Net).

    With ``nnunet_compat`` it is nnU-Net v2's map exactly: centred on voxel ``size // 2`` (half a voxel
    past the middle of an even window) and cut to 0 beyond 4 sigma (scipy's gaussian_filter of a
    delta), before the zeros are raised."""
    axes = []
    for size in roi_size:
        sigma = max(size * sigma_scale, 1e-6)
        centre = size // 2 if nnunet_compat else (size - 1) / 2
        position = torch.arange(size, dtype=torch.float64, device=device) - centre
        axis = torch.exp(-0.5 * (position / sigma) ** 2)
        if nnunet_compat:
            axis[position.abs() > int(4.0 * sigma + 0.5)] = 0.0
        axes.append(axis)
    weights = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).float()
    weights = weights / weights.max()
    positive = weights > 0
    if not positive.all():
        weights[~positive] = weights[positive].min()
    return weights


def window_starts(size: int, window: int, step_fraction: float) -> list[int]:
    """Start indices along one axis: the fewest windows at a step of at most ``step_fraction`` x window,
    spread evenly from 0 to ``size - window`` (nnU-Net's compute_steps_for_sliding_window), and never
    closer than one voxel: unique, at most ``size - window + 1`` of them whatever the overlap."""
    if window >= size:
        return [0]
    if not 0 < step_fraction <= 1:
        raise ValueError(f"the step must be in (0, 1] of the window (overlap in [0, 1)), got {step_fraction}")
    # a step under one voxel only repeats starts (nnU-Net's rule gives 4251 for 34 positions at overlap 0.999)
    num_steps = min(math.ceil((size - window) / (window * step_fraction)) + 1, size - window + 1)
    actual_step = (size - window) / (num_steps - 1)
    return [int(round(actual_step * i)) for i in range(num_steps)]


def count_windows(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Windows of one pass over a region of ``shape`` (z, y, x), padded up to ``roi_size`` where smaller, at
    ``overlap`` (mirror passes not counted), as
    :func:`~pancreas_mtl.inference.sliding_window.predict_windows` runs them."""
    return math.prod(len(window_starts(max(int(size), int(window)), int(window), 1.0 - overlap))
                     for size, window in zip(shape, roi_size))

class TooManyWindowsError(ValueError):
    """A pass over one case would run more windows than ``max_windows_per_case`` allows."""


def check_window_count(count: int, shape: Sequence[int], roi_size: Sequence[int], settings: InferenceSettings,
                       case_id: str | None = None) -> None:
    """Raise :class:`TooManyWindowsError` when ``count`` windows over ``shape`` exceed the settings' cap."""
    if count <= settings.max_windows_per_case:
        return
    case = f"case {case_id}: " if case_id else ""
    raise TooManyWindowsError(
        f"{case}{count} windows of {list(roi_size)} over the {list(shape)} image at overlap {settings.overlap:g} "
        f"(preset {settings.name}), expected at most max_windows_per_case={settings.max_windows_per_case}; "
        "lower inference.overlap, or raise inference.max_windows_per_case (in training: module.validation.*)")

def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the spatial axes (0=z, 1=y, 2=x) as tensor dims of (N, C, Z, Y, X), the
    unflipped pass first: [(), (2,), (3,), (2, 3), ...]; 2^len(axes) passes."""
    axes = sorted({int(axis) for axis in mirror_axes})
    if any(axis not in (0, 1, 2) for axis in axes):
        raise ValueError(f"mirror axes are spatial axes 0 (z), 1 (y), 2 (x); got {list(mirror_axes)}")
    return [tuple(axis + 2 for axis in combo)
            for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]
