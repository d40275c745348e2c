"""A dataset as it is read: cases per split and subtype, per-case spacing, shape, volumes and intensities,
intensity histograms inside the pancreas and the lesion, and mid-lesion slices (the data notebook's tables).

Every case is read through :func:`~pancreas_mtl.raw.checks.load_case`, so what is summarised is what
training sees, and a broken case is an error naming it and its file. Arrays are (Z, Y, X), spacings
(z, y, x) in mm; intensities are the first channel's values as stored (HU for CT).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.checks import LoadedCase, load_case
from pancreas_mtl.raw.layout import SPLITS, DatasetIndex, discover
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.tables import Table

STRUCTURES = ("pancreas", "lesion")  # label 1 and the lesion label; the whole gland is both


@dataclass
class DatasetSummary:
    """What :func:`summarise_dataset` found.

    Attributes:
        index: the discovered dataset.
        cases: one row per labelled case: split, subtype, spacing (z, y, x) mm, shape (z, y, x),
            pancreas and lesion volume (ml), mean and sd of the intensity inside each, the lesion's middle
            slice ``lesion_z``.
        bin_edges: (B + 1,) intensity histogram edges.
        histograms: {structure: {subtype: (B,) voxel counts}}; subtype None for cases without one.
    """

    index: DatasetIndex
    cases: Table
    bin_edges: np.ndarray
    histograms: dict[str, dict[int | None, np.ndarray]] = field(default_factory=dict)


def split_subtype_counts(index: DatasetIndex) -> Table:
    """Cases per split (rows) and subtype (columns), with unlabelled and total counts."""
    counts = Counter((case.split, case.subtype) for case in index.cases)
    subtypes = sorted({subtype for _, subtype in counts if subtype is not None})
    rows = []
    for split in [s for s in SPLITS if any(key[0] == s for key in counts)]:
        row = {"split": split, **{f"subtype {k}": counts.get((split, k), 0) for k in subtypes}}
        row["no subtype"] = counts.get((split, None), 0)
        row["labelled"] = sum(1 for case in index.split(split) if case.label_path is not None)
        row["total"] = len(index.split(split))
        rows.append(row)
    return Table(rows, title=f"{index.name} ({index.layout} layout): cases per split and subtype")


def mid_lesion_slice(mask: np.ndarray, lesion_label: int) -> int:
    """The axial index (z) in the middle of the lesion's extent; of the gland without a lesion; else the middle."""
    for structure in (mask == lesion_label, mask > 0):
        slices = np.flatnonzero(structure.reshape(structure.shape[0], -1).any(axis=1))
        if slices.size:
            return int((slices[0] + slices[-1]) // 2)
    return mask.shape[0] // 2


def _structure_masks(seg: np.ndarray, lesion_label: int) -> dict[str, np.ndarray]:
    return {"pancreas": (seg > 0) & (seg != lesion_label), "lesion": seg == lesion_label}


def case_row(loaded: LoadedCase, lesion_label: int) -> dict:
    """The summary row of one loaded, labelled case (see :class:`DatasetSummary`)."""
    spacing = loaded.spacing
    voxel_ml = float(np.prod(spacing)) / 1000.0
    image = loaded.image[0]
    row = {"case_id": loaded.case.case_id, "split": loaded.case.split, "subtype": loaded.case.subtype,
           **{f"spacing_{axis}": float(s) for axis, s in zip("zyx", spacing)},
           **{f"shape_{axis}": int(s) for axis, s in zip("zyx", image.shape)}}
    for name, mask in _structure_masks(loaded.seg, lesion_label).items():
        values = image[mask]
        row[f"{name}_ml"] = float(mask.sum()) * voxel_ml
        row[f"{name}_mean"] = float(values.mean()) if values.size else float("nan")
        row[f"{name}_sd"] = float(values.std()) if values.size else float("nan")
    row["lesion_z"] = mid_lesion_slice(loaded.seg, lesion_label)
    return row


def summarise_dataset(root: str | Path, *, num_subtypes: int = 3, splits: Sequence[str] | None = None,
                      intensity_range: Sequence[float] = (-200.0, 300.0), bins: int = 100,
                      limits: InputLimits | None = None) -> DatasetSummary:
    """Read every labelled case of ``root`` (either layout; ``splits`` picks some) into a DatasetSummary.

    Args:
        intensity_range: (low, high) of the histograms; values outside are counted in the end bins.
        bins: histogram bins.
    """
    index = discover(root, num_subtypes=num_subtypes)
    cases = [c for c in index.labelled if splits is None or c.split in splits]
    if not cases:
        raise ValueError(f"{index.root}: no labelled case{' in splits ' + ', '.join(splits) if splits else ''}")
    lesion_label = index.labels.get("lesion", 2)
    low, high = float(intensity_range[0]), float(intensity_range[1])
    if not high > low or bins < 1:
        raise ValueError(f"intensity_range must be (low, high) with low < high and bins >= 1, got "
                         f"{tuple(intensity_range)} and {bins}")
    edges = np.linspace(low, high, bins + 1)
    histograms: dict[str, dict[int | None, np.ndarray]] = {name: {} for name in STRUCTURES}
    rows = []
    for case in cases:
        loaded = load_case(case, index.label_values, limits)
        rows.append(case_row(loaded, lesion_label))
        for name, mask in _structure_masks(loaded.seg, lesion_label).items():
            counts, _ = np.histogram(np.clip(loaded.image[0][mask], low, high), bins=edges)
            histograms[name][case.subtype] = histograms[name].get(case.subtype, 0) + counts
    return DatasetSummary(index, Table(rows, title="cases as read"), edges, histograms)


def by_subtype(cases: Table, columns: Sequence[str]) -> Table:
    """Median, min and max of ``columns`` per subtype (and over all cases)."""
    groups = sorted({row["subtype"] for row in cases}, key=lambda s: (s is None, s))
    rows = []
    for group, label in [(g, f"subtype {g}" if g is not None else "no subtype") for g in groups] + [("all", "all")]:
        chosen = [row for row in cases if group == "all" or row["subtype"] == group]
        row = {"subtype": label, "cases": len(chosen)}
        for column in columns:
            values = np.array([r[column] for r in chosen], dtype=np.float64)
            values = values[np.isfinite(values)]
            row.update({f"{column} median": float(np.median(values)) if values.size else None,
                        f"{column} min": float(values.min()) if values.size else None,
                        f"{column} max": float(values.max()) if values.size else None})
        rows.append(row)
    return Table(rows)


@dataclass
class SliceView:
    """One axial slice of a case: image (Y, X), labels (Y, X), the slice index and (y, x) spacing in mm."""

    case_id: str
    subtype: int | None
    z: int
    image: np.ndarray
    labels: np.ndarray
    spacing_yx: tuple[float, float]


def mid_lesion_views(root: str | Path | DatasetIndex, cases_per_subtype: int = 4, *, num_subtypes: int = 3,
                     splits: Sequence[str] | None = None, limits: InputLimits | None = None) -> list[SliceView]:
    """The mid-lesion slice of the first ``cases_per_subtype`` labelled cases of every subtype (by case id)."""
    index = root if isinstance(root, DatasetIndex) else discover(root, num_subtypes=num_subtypes)
    lesion_label = index.labels.get("lesion", 2)
    chosen: dict[int | None, list] = {}
    for case in index.labelled:
        if (splits is None or case.split in splits) and len(chosen.setdefault(case.subtype, [])) < cases_per_subtype:
            chosen[case.subtype].append(case)
    views = []
    for subtype in sorted(chosen, key=lambda s: (s is None, s)):
        for case in chosen[subtype]:
            loaded = load_case(case, index.label_values, limits)
            z = mid_lesion_slice(loaded.seg, lesion_label)
            views.append(SliceView(case.case_id, subtype, z, loaded.image[0, z], loaded.seg[z],
                                   (float(loaded.spacing[1]), float(loaded.spacing[2]))))
    return views
