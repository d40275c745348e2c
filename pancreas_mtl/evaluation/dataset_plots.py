"""Figures of a dataset as it is read (:mod:`pancreas_mtl.raw.summary`): spacing and shape distributions,
intensity histograms inside the pancreas and the lesion per subtype, lesion volume per subtype, and a
montage of mid-lesion slices per subtype with the mask outlines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pancreas_mtl.raw.summary import STRUCTURES, DatasetSummary, SliceView
from pancreas_mtl.evaluation.figures import SOFT_TISSUE_WINDOW, new_figure, show_slice
from pancreas_mtl.tables import Table


def _subtype_name(subtype) -> str:
    return f"subtype {subtype}" if subtype is not None else "no subtype"


def spacing_shape_figure(cases: Table):
    """Histograms of the voxel spacing (mm) and the shape (voxels) along z, y and x, all cases."""
    figure = new_figure(figsize=(11, 5.5))
    axes = figure.subplots(2, 3)
    for column, axis_name in enumerate("zyx"):
        for row, (prefix, unit) in enumerate((("spacing", "mm"), ("shape", "voxels"))):
            values = np.array(cases.column(f"{prefix}_{axis_name}"), dtype=np.float64)
            axes[row, column].hist(values, bins=min(20, max(len(values), 1)), color="steelblue")
            axes[row, column].set_title(f"{prefix} {axis_name} ({unit})", fontsize=9)
            axes[row, column].set_ylabel("cases")
    figure.tight_layout()
    return figure


def intensity_histograms_figure(summary: DatasetSummary):
    """Intensity distribution inside each structure, one line per subtype, normalised to a density."""
    edges = summary.bin_edges
    centres = (edges[:-1] + edges[1:]) / 2
    figure = new_figure(figsize=(10, 3.8))
    axes = figure.subplots(1, len(STRUCTURES), sharey=True)
    for axis, structure in zip(np.atleast_1d(axes), STRUCTURES):
        per_subtype = summary.histograms.get(structure, {})
        for subtype in sorted(per_subtype, key=lambda s: (s is None, s)):
            counts = np.asarray(per_subtype[subtype], dtype=np.float64)
            if counts.sum():
                axis.plot(centres, counts / counts.sum() / np.diff(edges), label=_subtype_name(subtype))
        axis.set_title(f"inside the {structure}")
        axis.set_xlabel(f"intensity (values outside [{edges[0]:g}, {edges[-1]:g}] in the end bins)")
        axis.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("density")
    figure.tight_layout()
    return figure


def per_subtype_figure(cases: Table, columns: Sequence[str] = ("lesion_ml", "pancreas_ml"),
                       titles: Sequence[str] = ("lesion volume (ml)", "pancreas volume without lesion (ml)")):
    """Box plots with the cases on top, one panel per column, one box per subtype."""
    groups = sorted({row["subtype"] for row in cases}, key=lambda s: (s is None, s))
    figure = new_figure(figsize=(4.5 * len(columns), 3.8))
    axes = np.atleast_1d(figure.subplots(1, len(columns)))
    for axis, column, title in zip(axes, columns, titles):
        data = [[row[column] for row in cases if row["subtype"] == group and np.isfinite(row[column])]
                for group in groups]
        axis.boxplot(data, showfliers=False)
        for position, values in enumerate(data, start=1):
            jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(values))
            axis.scatter(position + jitter, values, s=10, alpha=0.6)
        axis.set_xticks(range(1, len(groups) + 1), [_subtype_name(g) for g in groups])
        axis.set_title(title)
    figure.tight_layout()
    return figure


def montage_figure(views: Sequence[SliceView], window: Sequence[float] | None = SOFT_TISSUE_WINDOW):
    """One row per subtype, one column per case: the mid-lesion slice with the pancreas (green) and lesion
    (red) outlined, intensities shown between ``window`` (None: each slice's 1st and 99th percentile)."""
    subtypes = sorted({view.subtype for view in views}, key=lambda s: (s is None, s))
    columns = max((sum(1 for v in views if v.subtype == s) for s in subtypes), default=1)
    figure = new_figure(figsize=(2.8 * columns, 2.6 * max(len(subtypes), 1)))
    axes = np.array(figure.subplots(max(len(subtypes), 1), columns, squeeze=False))
    for row, subtype in enumerate(subtypes):
        chosen = [view for view in views if view.subtype == subtype]
        for column in range(columns):
            axis = axes[row, column]
            if column >= len(chosen):
                axis.set_axis_off()
                continue
            view = chosen[column]
            show_slice(axis, view.image, np.zeros_like(view.labels), view.spacing_yx,
                       f"{_subtype_name(subtype)}: {view.case_id}, z {view.z}", contour=view.labels, window=window)
    figure.tight_layout()
    return figure
