"""Preprocessing one case as the plan says: crop to the nonzero region, normalise, resample.

The order is nnU-Net's: crop, then normalise (statistics of the original voxels), then resample.
Training (through the cache) and prediction call the same function, so they see the same voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pancreas_mtl.raw.checks import LoadedCase
from pancreas_mtl.raw.cropping import crop, nonzero_bbox
from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.limits import InputLimits, config_key
from pancreas_mtl.dataset.resampling import resample_image, resample_segmentation, resampled_shape
from pancreas_mtl.planning.anisotropy import ANISOTROPY_THRESHOLD, separate_axis
from pancreas_mtl.planning.plan import ChannelNormalization, Plan


@dataclass
class PreprocessedCase:
    """A case on the plan's grid.

    Attributes:
        image: (C, Z, Y, X) float32, normalised, at the target spacing: a numpy array, or a tensor on the
            device ``preprocess`` was given (prediction on a GPU).
        seg: (Z, Y, X) int8 or None.
        bbox: crop in the original grid, [start, stop) per axis (z, y, x).
        original_shape: (z, y, x) of the input before cropping.
        original_spacing: (z, y, x) mm of the input.
        anisotropy_threshold: the plan's separate-axis threshold it was resampled with; export resamples
            back with the same (``planning.anisotropy.separate_axis``).
    """

    image: np.ndarray | torch.Tensor
    seg: np.ndarray | None
    bbox: tuple[tuple[int, int], ...]
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD


def normalize(image: np.ndarray, schemes: list[ChannelNormalization]) -> np.ndarray:
    """image: (C, Z, Y, X) -> float32 normalised per channel (``ct``: clip + dataset z-score; ``zscore``: per case)."""
    if len(schemes) != image.shape[0]:
        raise ValueError(f"plan normalises {len(schemes)} channel(s), the image has {image.shape[0]}")
    out = np.empty(image.shape, dtype=np.float32)
    for channel, scheme in enumerate(schemes):
        values = image[channel].astype(np.float32, copy=False)
        if scheme.scheme == "ct":
            clipped = np.clip(values, scheme.clip_low, scheme.clip_high)
            out[channel] = (clipped - scheme.mean) / max(scheme.std, 1e-8)
        elif scheme.scheme == "zscore":
            out[channel] = (values - values.mean()) / max(float(values.std()), 1e-8)
        else:
            raise ValueError(f"unknown normalisation scheme {scheme.scheme!r} (expected 'ct' or 'zscore')")
    return out


def check_resampled_size(loaded: LoadedCase, crop_shape: tuple[int, ...], target_spacing, max_voxels: int
                          ) -> tuple[int, ...]:
    """The (z, y, x) shape of the cropped case at ``target_spacing``; a DataError naming the case, its
    spacing, the target spacing and the shape when that shape has more than ``max_voxels`` voxels."""
    spacing = loaded.spacing
    new_shape = resampled_shape(crop_shape, spacing, target_spacing)
    voxels = int(np.prod(new_shape, dtype=np.float64))
    if voxels > max_voxels:
        source = tuple(round(s, 4) for s in spacing)
        target = tuple(round(float(t), 4) for t in target_spacing)
        raise DataError(loaded.case.image_paths[0],
                        f"resampling from spacing (z, y, x) {source} mm to the plan's {target} mm would "
                        f"give shape {new_shape} (crop {tuple(crop_shape)}), {voxels:,} voxels per channel, "
                        f"expected at most {max_voxels:,}; raise {config_key('max_resampled_voxels')} if it "
                        f"fits in memory",
                        loaded.case.case_id)
    return new_shape


def preprocess(loaded: LoadedCase, plan: Plan, image_order: int = 1, *,
               max_resampled_voxels: int | None = None, device: torch.device | str | None = None
               ) -> PreprocessedCase:
    """Crop, normalise and resample a loaded case to the plan's target spacing; the image linearly
    (``image_order`` 1, as training's cache does) or with nnU-Net's cubic resampling (3). An axis is
    resampled separately as ``separate_axis(case spacing, plan spacing, plan.anisotropy_threshold)`` says.

    ``max_resampled_voxels`` (None: ``InputLimits.defaults().max_resampled_voxels``) bounds the voxels per
    channel at the target spacing; a larger case is a DataError before anything is allocated.
    ``device`` (a GPU the network predicts on): the cropped, normalised image goes there once and is
    resampled there (linear or cubic), and the preprocessed image stays there as a tensor; None or a
    CPU: a numpy array, as the cache stores it.
    """
    if max_resampled_voxels is None:
        max_resampled_voxels = InputLimits.defaults().max_resampled_voxels
    spacing = loaded.spacing
    bbox = nonzero_bbox(loaded.image)
    crop_shape = tuple(stop - start for start, stop in bbox)
    new_shape = check_resampled_size(loaded, crop_shape, plan.target_spacing, max_resampled_voxels)
    image = normalize(crop(loaded.image, bbox), plan.normalization)
    # nnU-Net's order: the case's grid decides when it is anisotropic, else the plan's
    axis = separate_axis(spacing, plan.target_spacing, plan.anisotropy_threshold)
    with torch.inference_mode():
        on_device = device is not None and torch.device(device).type != "cpu"
        source = torch.from_numpy(image).to(device) if on_device else torch.from_numpy(image)
        image = resample_image(source, new_shape, axis, image_order)
        image = image if on_device else image.numpy()
        seg = None
        if loaded.seg is not None:
            seg = resample_segmentation(torch.from_numpy(crop(loaded.seg, bbox).copy()), new_shape,
                                        sorted(plan.labels.values()), axis).numpy().astype(np.int8)
    return PreprocessedCase(image=image, seg=seg, bbox=bbox, original_shape=tuple(loaded.image.shape[1:]),
                            original_spacing=spacing, anisotropy_threshold=plan.anisotropy_threshold)


def sample_foreground_locations(seg: np.ndarray, rng: np.random.Generator, max_per_label: int = 10_000,
                                min_fraction: float = 0.01) -> np.ndarray:
    """Rows (label, z, y, x) int32: up to ``max_per_label`` voxels of each foreground label.

    As nnU-Net does, at least ``min_fraction`` of a label's voxels are kept, so the sample of a
    large structure still covers it.
    """
    rows = []
    for label in np.unique(seg):
        if label <= 0:
            continue
        coordinates = np.argwhere(seg == label)
        count = min(len(coordinates), max(max_per_label, int(np.ceil(len(coordinates) * min_fraction))))
        if count < len(coordinates):
            coordinates = coordinates[rng.choice(len(coordinates), count, replace=False)]
        rows.append(np.column_stack([np.full(len(coordinates), label), coordinates]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), dtype=np.int32)
