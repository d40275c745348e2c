"""Preprocessing one case as the plan says: crop to the nonzero region, normalise, resample.

The order is nnU-Net's: crop, then normalise (statistics of the original voxels), then resample.
Training (through the cache) and prediction call the same function, so they see the same voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pancreas_mtl.data.checks import LoadedCase
from pancreas_mtl.data.resampling import resample_image, resample_segmentation, resampled_shape, separate_axis
from pancreas_mtl.planning.fingerprint import nonzero_bbox
from pancreas_mtl.planning.plan import ChannelNormalization, Plan


@dataclass
class PreprocessedCase:
    """A case on the plan's grid.

    Attributes:
        image: (C, Z, Y, X) float32, normalised, at the target spacing.
        seg: (Z, Y, X) int8 or None.
        bbox: crop in the original grid, [start, stop) per axis (z, y, x).
        original_shape: (z, y, x) of the input before cropping.
        original_spacing: (z, y, x) mm of the input.
    """

    image: np.ndarray
    seg: np.ndarray | None
    bbox: tuple[tuple[int, int], ...]
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]


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


def crop(array: np.ndarray, bbox: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the last three axes (z, y, x) to ``bbox``."""
    return array[(..., *(slice(start, stop) for start, stop in bbox))]


def preprocess(loaded: LoadedCase, plan: Plan, image_order: int = 1) -> PreprocessedCase:
    """Crop, normalise and resample a loaded case to the plan's target spacing; the image linearly
    (``image_order`` 1, as training's cache does) or with nnU-Net's cubic resampling (3)."""
    spacing = loaded.spacing
    bbox = nonzero_bbox(loaded.image)
    image = normalize(crop(loaded.image, bbox), plan.normalization)
    new_shape = resampled_shape(image.shape[1:], spacing, plan.target_spacing)
    axis = separate_axis(spacing, plan.target_spacing)
    with torch.inference_mode():
        image = resample_image(torch.from_numpy(image), new_shape, axis, image_order).numpy()
        seg = None
        if loaded.seg is not None:
            seg = resample_segmentation(torch.from_numpy(crop(loaded.seg, bbox).copy()), new_shape,
                                        sorted(plan.labels.values()), axis).numpy().astype(np.int8)
    return PreprocessedCase(image=image, seg=seg, bbox=bbox, original_shape=tuple(loaded.image.shape[1:]),
                            original_spacing=spacing)


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
