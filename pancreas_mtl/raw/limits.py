"""Plausibility limits on input images: the CT spacing range and the most voxels read or resampled.

The values live in conf/limits/default.yaml only (``data.limits`` in training, ``limits`` in
prediction's config; ``InputLimits.defaults()`` reads the file): the schema holds none. They catch a
wrong unit in a header (a file in metres read as millimetres has 0.001 mm voxels) and a header or a
plan that would allocate more memory than the machine has, before anything is allocated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from pancreas_mtl.config import config_dir


@dataclass(frozen=True)
class InputLimits:
    """Attributes:
        min_spacing_mm: smallest plausible voxel spacing along any axis, in mm.
        max_spacing_mm: largest plausible voxel spacing along any axis, in mm.
        max_image_voxels: most voxels an image file may declare in its header (checked before reading).
        max_resampled_voxels: most voxels per channel a case may have at the plan's target spacing
            (checked before resampling).
    """

    # no values: they are conf/limits/default.yaml's
    min_spacing_mm: float = MISSING
    max_spacing_mm: float = MISSING
    max_image_voxels: int = MISSING
    max_resampled_voxels: int = MISSING

    def __post_init__(self) -> None:
        missing = [f.name for f in fields(self) if isinstance(getattr(self, f.name), str)
                   and getattr(self, f.name) == MISSING]
        if missing:
            raise TypeError(f"InputLimits needs every limit, {missing} not given; the values live in "
                            f"{defaults_file()}: InputLimits.defaults() or .from_config(mapping) reads them")
        if not 0 < self.min_spacing_mm < self.max_spacing_mm:
            raise ValueError(f"limits: expected 0 < min_spacing_mm < max_spacing_mm, found "
                             f"{self.min_spacing_mm} and {self.max_spacing_mm}")
        if self.max_image_voxels < 1 or self.max_resampled_voxels < 1:
            raise ValueError(f"limits: expected positive voxel limits, found max_image_voxels "
                             f"{self.max_image_voxels}, max_resampled_voxels {self.max_resampled_voxels}")

    @classmethod
    def defaults(cls) -> InputLimits:
        """The limits of conf/limits/default.yaml."""
        return cls.from_config(None)

    @classmethod
    def from_config(cls, config: Mapping | None) -> InputLimits:
        """From a ``limits`` config node (dict or DictConfig); the keys it leaves out are
        conf/limits/default.yaml's."""
        config = dict(config or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"limits: unknown key(s) {unknown}; expected some of {sorted(known)}")
        if set(config) != known:
            config = {**_file_values(str(defaults_file())), **config}
        return cls(**{name: (int(value) if name.endswith("voxels") else float(value))
                      for name, value in config.items()})


def defaults_file() -> Path:
    """conf/limits/default.yaml, the one home of the limits' values."""
    return config_dir() / "limits" / "default.yaml"


@functools.lru_cache(maxsize=4)
def _file_values(path: str) -> dict:
    # read once per process: prediction and preprocessing ask for the limits once per case
    return OmegaConf.to_container(OmegaConf.load(path))


def config_key(name: str) -> str:
    """Where a user raises the limit ``name``, for error messages."""
    return f"data.limits.{name} (train.py) or limits.{name} (predict.py)"
