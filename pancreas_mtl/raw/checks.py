"""Loading one case with its content checked: size, geometry, finiteness and label hygiene.

Every check raises a DataError naming the case, the file and what was expected versus found. The
fingerprint pass loads every case through ``load_case`` and collects the errors of all cases, so a
dataset check reports every problem at once. The plausible spacing range and the largest image come
from ``InputLimits`` (``data.limits`` in the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.io import Volume, read_volume
from pancreas_mtl.raw.layout import Case
from pancreas_mtl.raw.limits import InputLimits, config_key

# Labels stored as floats (the real data has 1.0000153) are rounded when this close to an integer.
LABEL_ROUNDING_TOLERANCE = 1e-3
AFFINE_ATOL_MM = 1e-3
MIN_VOXELS_PER_AXIS = 3


@dataclass
class LoadedCase:
    """A case in memory.

    Attributes:
        image: (C, Z, Y, X) float32, channels in the dataset's channel order.
        seg: (Z, Y, X) uint8 labels, or None for an unlabelled case.
        affine: 4x4 voxel (x, y, z) to RAS mm of the first channel's file.
    """

    case: Case
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return Volume(self.image[0], self.affine).spacing


def check_geometry(volume: Volume, path: Path, limits: InputLimits | None = None) -> None:
    """A usable 3D grid: at least 3 voxels per axis, spacing within the plausible CT range of ``limits``
    (default ``InputLimits.defaults()``), orthogonal axes, finite values."""
    limits = limits or InputLimits.defaults()
    if min(volume.shape) < MIN_VOXELS_PER_AXIS:
        raise DataError(path, f"expected at least {MIN_VOXELS_PER_AXIS} voxels along every axis, "
                              f"found shape (z, y, x) {volume.shape}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DataError(path, f"affine has non-finite entries:\n{affine}")
    spacing = np.asarray(volume.spacing)
    if np.any(spacing <= 1e-6):
        raise DataError(path, f"expected positive voxel spacing, found (z, y, x) {tuple(spacing.round(6))} mm")
    # the relative slack keeps a header's float32 0.1 or 20 (or a rotated affine's column norm) inside
    low, high = limits.min_spacing_mm, limits.max_spacing_mm
    if np.any(spacing < low * (1 - 1e-6)) or np.any(spacing > high * (1 + 1e-6)):
        found = tuple(float(f"{s:.6g}") for s in spacing)
        raise DataError(path, f"expected voxel spacing from {low:g} to {high:g} mm along every axis, "
                              f"found (z, y, x) {found} mm; a wrong unit in the header (NIfTI xyzt_units) is "
                              f"the usual cause; else widen the range ({config_key('min_spacing_mm')}, "
                              f"likewise max_spacing_mm)")
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    off_diagonal = np.abs(directions.T @ directions - np.eye(3)).max()
    if off_diagonal > 1e-3:
        raise DataError(path, f"expected orthogonal voxel axes, found a sheared affine (max |cos| between axes "
                              f"{off_diagonal:.4f}); resample it to an orthogonal grid first")


def check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise DataError(path, f"expected finite voxels, found {int(bad.sum())} NaN or infinite value(s)")


def check_not_constant(array: np.ndarray, path: Path) -> None:
    """One value everywhere is a blank or failed export, not a scan: nothing to segment or normalise."""
    low, high = array.min(), array.max()
    if low == high:
        raise DataError(path, f"expected an image with varying intensities, found the constant {low!r} in every voxel")


def clean_labels(array: np.ndarray, allowed: set[int], path: Path) -> np.ndarray:
    """Labels as uint8: floats within tolerance of an integer are rounded; anything else is an error."""
    values = np.unique(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise DataError(path, "mask contains NaN or infinite values")
        rounded = np.rint(values)
        off = values[np.abs(values - rounded) > LABEL_ROUNDING_TOLERANCE]
        if off.size:
            raise DataError(path, f"mask values must be integers (within {LABEL_ROUNDING_TOLERANCE}), "
                                  f"found {', '.join(f'{v:g}' for v in off[:5])}")
        values = rounded
    unexpected = sorted(int(v) for v in set(values.astype(np.int64).tolist()) - allowed)
    if unexpected:
        raise DataError(path, f"mask labels must be in {sorted(allowed)}, found {unexpected}")
    return np.rint(array).astype(np.uint8) if np.issubdtype(array.dtype, np.floating) else array.astype(np.uint8)


def same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=1e-4, atol=AFFINE_ATOL_MM)


def load_case(case: Case, allowed_labels: set[int] | None = None,
              limits: InputLimits | None = None) -> LoadedCase:
    """Read and check all channels and the mask of a case; raises DataError naming case and file.

    Args:
        limits: plausible spacing and the most voxels a file may declare; None: ``InputLimits.defaults()``.
    """
    allowed_labels = allowed_labels if allowed_labels is not None else {0, 1, 2}
    limits = limits or InputLimits.defaults()
    try:
        channels: list[Volume] = []
        for path in case.image_paths:
            volume = read_volume(path, max_voxels=limits.max_image_voxels)
            check_geometry(volume, path, limits)
            check_finite(volume.array, path)
            check_not_constant(volume.array, path)
            if channels and not same_grid(channels[0], volume):
                raise DataError(path, f"channel grid differs from {case.image_paths[0].name}: shape "
                                      f"{volume.shape} vs {channels[0].shape}, affine\n{volume.affine}\nvs\n{channels[0].affine}")
            channels.append(volume)
        reference = channels[0]
        seg = None
        if case.label_path is not None:
            mask = read_volume(case.label_path, max_voxels=limits.max_image_voxels)
            if mask.shape != reference.shape:
                raise DataError(case.label_path, f"mask shape (z, y, x) {mask.shape} differs from image "
                                                 f"{reference.shape} ({case.image_paths[0].name})")
            if not same_grid(reference, mask):
                raise DataError(case.label_path, f"mask affine differs from the image's "
                                                 f"({case.image_paths[0].name}):\n{mask.affine}\nvs\n{reference.affine}")
            seg = clean_labels(mask.array, allowed_labels, case.label_path)
    except DataError as error:
        raise error.for_case(case.case_id) from None
    image = np.stack([np.asarray(v.array, dtype=np.float32) for v in channels])
    return LoadedCase(case=case, image=image, seg=seg, affine=reference.affine)
