"""Plausibility limits on input images: the CT spacing range and the most voxels read or resampled.

The defaults are those of conf/limits/default.yaml (``data.limits`` in training,
``limits`` in prediction's config); ``tests/test_units_spacing.py`` keeps the two equal. They catch a
wrong unit in a header (a file in metres read as millimetres has 0.001 mm voxels) and a header or a
plan that would allocate more memory than the machine has, before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class InputLimits:
    """Attributes:
        min_spacing_mm: smallest plausible voxel spacing along any axis, in mm.
        max_spacing_mm: largest plausible voxel spacing along any axis, in mm.
        max_image_voxels: most voxels an image file may declare in its header (checked before reading).
        max_resampled_voxels: most voxels per channel a case may have at the plan's target spacing
            (checked before resampling).
    """

    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 20.0
    max_image_voxels: int = 1_000_000_000
    max_resampled_voxels: int = 1_000_000_000

    def __post_init__(self) -> None:
        if not 0 < self.min_spacing_mm < self.max_spacing_mm:
            raise ValueError(f"limits: expected 0 < min_spacing_mm < max_spacing_mm, found "
                             f"{self.min_spacing_mm} and {self.max_spacing_mm}")
        if self.max_image_voxels < 1 or self.max_resampled_voxels < 1:
            raise ValueError(f"limits: expected positive voxel limits, found max_image_voxels "
                             f"{self.max_image_voxels}, max_resampled_voxels {self.max_resampled_voxels}")

    @classmethod
    def from_config(cls, config: Mapping | None) -> InputLimits:
        """From a ``limits`` config node (dict or DictConfig); missing keys keep the defaults."""
        config = dict(config or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"limits: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**{name: (int(value) if name.endswith("voxels") else float(value))
                      for name, value in config.items()})


def config_key(name: str) -> str:
    """Where a user raises the limit ``name``, for error messages."""
    return f"data.limits.{name} (train.py) or limits.{name} (predict.py)"
