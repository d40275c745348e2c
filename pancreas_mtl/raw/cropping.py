"""Cropping a case to the region its image covers: nnU-Net's crop to the nonzero voxels.

Arrays are (C, Z, Y, X) images or (Z, Y, X) masks; boxes are [start, stop) per axis (z, y, x). The
fingerprint measures shapes after this crop and preprocessing applies it, so both call these.
"""

from __future__ import annotations

import numpy as np


def nonzero_bbox(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box [start, stop) per axis (z, y, x) of voxels nonzero in any channel of ``image``
    (C, Z, Y, X); the whole volume if none."""
    nonzero = np.any(image != 0, axis=0)
    if not nonzero.any():
        return tuple((0, s) for s in nonzero.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(nonzero.any(axis=other))
        box.append((int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def crop(array: np.ndarray, bbox: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the last three axes (z, y, x) to ``bbox``."""
    return array[(..., *(slice(start, stop) for start, stop in bbox))]
