"""Resampling images and label maps between spacings, in torch so it runs on the GPU as well as the CPU.

nnU-Net resamples images with cubic splines and label maps with per-label linear interpolation, and
treats a much coarser axis separately (nearest neighbour along it, in-plane interpolation only; which
axis is ``planning.anisotropy.separate_axis`` with the plan's ``anisotropy_threshold``).
We keep the separate-axis rule and the per-label scheme but interpolate linearly: on this data the
target spacing is close to the source spacing and linear interpolation is several times faster
(see docs/benchmarks.md). ``resample_image(..., order=3)`` is nnU-Net's image resampling itself
(cubic B-spline, edge mode, clipped to the input's range, slice by slice when an axis is separate),
for predictions that reproduce nnU-Net's (``inference.nnunet_compat``). It runs on the image's device
too: a cubic B-spline zoom is linear and separable, so scipy's zoom along one axis is computed once as
a matrix (scipy applied to the unit vectors) and the volume is multiplied by one matrix per axis.
All tensors are (Z, Y, X) in their spatial axes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# which axis is separate is planning's rule (re-exported: callers pass its result as ``axis``)
from pancreas_mtl.planning.anisotropy import separate_axis  # noqa: F401


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape (z, y, x) covering the same extent at ``target_spacing``; at least one voxel per axis."""
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing))


def _nearest_indices(old: int, new: int, device: torch.device) -> torch.Tensor:
    """Source index of each target voxel centre along one axis (align_corners=False convention)."""
    centres = (torch.arange(new, device=device, dtype=torch.float64) + 0.5) * (old / new)
    return centres.floor().long().clamp_(0, old - 1)


def _interpolate(volumes: torch.Tensor, new_shape: tuple[int, int, int], axis: int | None) -> torch.Tensor:
    """volumes: (N, Z, Y, X) float -> (N, *new_shape); linear, or in-plane linear + nearest along ``axis``."""
    if tuple(volumes.shape[1:]) == tuple(new_shape):
        return volumes
    if axis is None:
        return F.interpolate(volumes[None], size=new_shape, mode="trilinear", align_corners=False)[0]
    moved = volumes.movedim(axis + 1, 1)  # (N, A, P, Q): A the separate axis
    n, a, p, q = moved.shape
    in_plane = [s for i, s in enumerate(new_shape) if i != axis]
    planes = F.interpolate(moved.reshape(n * a, 1, p, q), size=in_plane, mode="bilinear", align_corners=False)
    planes = planes.reshape(n, a, *in_plane)
    planes = planes.index_select(1, _nearest_indices(a, new_shape[axis], planes.device))
    return planes.movedim(1, axis + 1)


@lru_cache(maxsize=256)
def _cubic_operator(old: int, new: int) -> np.ndarray:
    """(new, old) float64: scipy's order-3 zoom of one axis from ``old`` to ``new`` voxels (cubic B-spline
    with its prefilter, voxel centres aligned as ``grid_mode``, edge values beyond the border; what skimage's
    resize does as nnU-Net calls it), as a matrix: the zoom of each unit vector. Along the other axis the
    zoom factor is 1, which evaluates the spline at its knots: the identity."""
    return ndimage.zoom(np.eye(old), (new / old, 1.0), order=3, mode="nearest", grid_mode=True)


def _zoom_axis(volumes: torch.Tensor, axis: int, new: int) -> torch.Tensor:
    """volumes (..., A, ...) float64 with ``axis`` counted from the end of the spatial axes' start: the
    cubic zoom of that axis to ``new`` voxels, on the volumes' device."""
    old = volumes.shape[axis]
    if old == new:
        return volumes
    operator = torch.from_numpy(_cubic_operator(old, new)).to(volumes.device)
    return torch.tensordot(volumes.movedim(axis, -1), operator, dims=([-1], [1])).movedim(-1, axis)


def _cubic(volumes: torch.Tensor, new_shape: tuple[int, int, int], axis: int | None) -> torch.Tensor:
    """volumes: (N, Z, Y, X) -> (N, *new_shape) float64 on their device; cubic, or slice by slice in-plane
    cubic + nearest along ``axis``. Each channel (each slice, slice by slice) is clipped to its own range."""
    data = volumes.detach().double()
    if axis is None:
        out = data
        for dim, size in enumerate(new_shape, start=1):
            out = _zoom_axis(out, dim, size)
        low, high = data.amin(dim=(1, 2, 3), keepdim=True), data.amax(dim=(1, 2, 3), keepdim=True)
        return torch.maximum(torch.minimum(out, high), low)
    planes = data.movedim(axis + 1, 1)                                       # (N, A, P, Q)
    in_plane = [s for i, s in enumerate(new_shape) if i != axis]
    out = _zoom_axis(_zoom_axis(planes, 2, in_plane[0]), 3, in_plane[1])
    low, high = planes.amin(dim=(2, 3), keepdim=True), planes.amax(dim=(2, 3), keepdim=True)
    out = torch.maximum(torch.minimum(out, high), low)
    out = out.index_select(1, _nearest_indices(out.shape[1], new_shape[axis], out.device))
    return out.movedim(1, axis + 1)


def resample_image(image: torch.Tensor, new_shape: Sequence[int], axis: int | None = None,
                   order: int = 1) -> torch.Tensor:
    """image: (C, Z, Y, X) float -> (C, *new_shape), same dtype and device.

    ``order`` 1: linear; 3: nnU-Net's cubic resampling; both in torch on the image's device.
    """
    new_shape = tuple(int(s) for s in new_shape)
    dtype = image.dtype
    if order == 3:
        if tuple(image.shape[1:]) == new_shape:
            return image
        return _cubic(image, new_shape, axis).to(device=image.device, dtype=dtype)
    if order != 1:
        raise ValueError(f"image resampling order must be 1 (linear) or 3 (cubic, nnU-Net), got {order}")
    compute = image if image.is_floating_point() else image.float()
    return _interpolate(compute, new_shape, axis).to(dtype)


def resample_segmentation(seg: torch.Tensor, new_shape: Sequence[int], labels: Sequence[int],
                          axis: int | None = None) -> torch.Tensor:
    """seg: (Z, Y, X) integer labels -> (*new_shape) uint8.

    Each foreground label is interpolated as its own binary map and kept where above 0.5, later
    labels overwriting earlier ones, so thin structures survive better than with nearest neighbour.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg.to(torch.uint8)
    result = torch.zeros(new_shape, dtype=torch.uint8, device=seg.device)
    for label in sorted(int(v) for v in labels if v != 0):
        binary = (seg == label).float()[None]
        if not binary.any():
            continue
        result[_interpolate(binary, new_shape, axis)[0] > 0.5] = label
    return result

