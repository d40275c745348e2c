"""One preprocessed case in the cache: memory-mappable arrays plus a JSON record of where it came from.

Files per case, in the cache folder of one plan::

    {case}_image.npy   float32 (C, Z, Y, X), normalised, at the plan's target spacing
    {case}_seg.npy     int8 (Z, Y, X), labels 0/1/2 (absent for unlabelled cases)
    {case}_fg.npy      int32 (N, 4) rows (label, z, y, x): sampled voxels of each foreground label
    {case}.json        properties and the SHA-256 of each array (checked before every run, cache.py);
                       written last, so its presence marks a complete entry
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.files import load_json


@dataclass(frozen=True)
class CachedCase:
    """Handle to one cached case; arrays are loaded lazily (memory-mapped by default)."""

    case_id: str
    folder: Path
    subtype: int | None
    shape: tuple[int, int, int]  # (Z, Y, X) after preprocessing
    has_label: bool

    @property
    def image_path(self) -> Path:
        return self.folder / f"{self.case_id}_image.npy"

    @property
    def seg_path(self) -> Path:
        return self.folder / f"{self.case_id}_seg.npy"

    @property
    def foreground_path(self) -> Path:
        return self.folder / f"{self.case_id}_fg.npy"

    @property
    def properties_path(self) -> Path:
        return self.folder / f"{self.case_id}.json"

    def load_image(self, mmap: bool = True) -> np.ndarray:
        """(C, Z, Y, X) float32."""
        return np.load(self.image_path, mmap_mode="r" if mmap else None)

    def load_seg(self, mmap: bool = True) -> np.ndarray | None:
        """(Z, Y, X) int8, or None for an unlabelled case."""
        return np.load(self.seg_path, mmap_mode="r" if mmap else None) if self.has_label else None

    def load_foreground_locations(self) -> np.ndarray:
        """(N, 4) int32 rows (label, z, y, x); empty (0, 4) when the case has no foreground."""
        if not self.has_label:
            return np.zeros((0, 4), dtype=np.int32)
        return np.load(self.foreground_path)

    def properties(self) -> dict:
        return load_json(self.properties_path)

    @classmethod
    def from_properties(cls, folder: Path, properties: dict) -> "CachedCase":
        return cls(case_id=properties["case_id"], folder=Path(folder), subtype=properties.get("subtype"),
                   shape=tuple(properties["shape_after_preprocessing"]), has_label=properties["has_label"])
