"""nnU-Net's separate-axis rule: which axis of an anisotropic grid is resampled on its own.

Resampling interpolates in-plane only and takes the nearest slice along that axis, so thick slices
are not blended into each other. This module is the one place the rule is written; the planner
(``Plan.anisotropic_axis``), preprocessing, export and nnU-Net model folders all call it, with the
plan's ``anisotropy_threshold``. Spacings are (z, y, x) mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# nnunetv2.configuration.ANISO_THRESHOLD; the planning presets' ``anisotropy_threshold`` default
ANISOTROPY_THRESHOLD = 3.0


def is_anisotropic(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> bool:
    """Whether the coarsest spacing exceeds ``threshold`` times the finest (nnU-Net's ``get_do_separate_z``)."""
    grid = np.asarray(spacing, dtype=float)
    return bool(grid.max() / grid.min() > threshold)


def anisotropic_axis(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis with the coarsest spacing of an anisotropic grid (nnU-Net's ``get_lowres_axis``), or None.

    None as well when two or three axes share the coarsest spacing: there is no single out-of-plane
    axis then, and nnU-Net treats none separately (its example: 0.24 x 1.25 x 1.25 mm).
    """
    if not is_anisotropic(spacing, threshold):
        return None
    grid = np.asarray(spacing, dtype=float)
    coarsest = np.flatnonzero(grid == grid.max())
    return int(coarsest[0]) if len(coarsest) == 1 else None


def separate_axis(source_spacing: Sequence[float], target_spacing: Sequence[float],
                  threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to resample with nearest neighbour only when going from ``source_spacing`` to
    ``target_spacing``, or None.

    nnU-Net's ``resample_data_or_seg_to_shape`` (``force_separate_z`` None), for images, label maps and
    predictions alike: the source grid decides when it is anisotropic, else the target grid. The
    order matters only when both are anisotropic along different axes: preprocessing passes
    (case spacing, plan spacing), export the reverse. A grid that is anisotropic but has two coarsest
    axes decides "none" without asking the other grid, as nnU-Net does.
    """
    for grid in (source_spacing, target_spacing):
        if is_anisotropic(grid, threshold):
            return anisotropic_axis(grid, threshold)
    return None
