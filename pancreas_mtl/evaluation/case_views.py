"""Looking at evaluated cases: the worst-case montage (image, reference, prediction on the slice
:func:`~pancreas_mtl.evaluation.selection.shown_slice` picks) and the lesions missed or over-segmented.

Arrays are (Z, Y, X) as :func:`~pancreas_mtl.raw.io.read_volume` returns them; a slice is (Y, X).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pancreas_mtl.raw.io import read_volume
from pancreas_mtl.evaluation.figures import SOFT_TISSUE_WINDOW, new_figure, show_slice
from pancreas_mtl.evaluation.metrics import LESION_LABEL
from pancreas_mtl.evaluation.references import CaseFiles
from pancreas_mtl.evaluation.selection import shown_slice
from pancreas_mtl.tables import Table


def worst_cases_figure(rows: Sequence[Mapping], case_files: Mapping[str, CaseFiles], metric: str = "lesion_dice",
                       window: Sequence[float] | None = SOFT_TISSUE_WINDOW):
    """One row per case of ``rows``: image, reference, prediction (with the reference's outlines) on the
    slice :func:`~pancreas_mtl.evaluation.selection.shown_slice` picks; ``window`` as
    :func:`~pancreas_mtl.evaluation.figures.show_slice`'s."""
    figure = new_figure(figsize=(9, 3 * max(len(rows), 1)))
    axes = np.atleast_2d(figure.subplots(max(len(rows), 1), 3))
    for axis_row, row in zip(axes, rows):
        files = case_files[row["case_id"]]
        truth, prediction = read_volume(files.truth), read_volume(files.prediction)
        image = read_volume(files.image).array if files.image is not None else None
        z = shown_slice(truth.array, prediction.array)
        spacing = truth.spacing[1:]
        value = row.get(metric)
        name = f"{row['case_id']} (subtype {row.get('subtype')}), z {z}"
        show_slice(axis_row[0], None if image is None else image[z], np.zeros_like(truth.array[z]), spacing, name,
                   window=window)
        show_slice(axis_row[1], None if image is None else image[z], truth.array[z], spacing, "reference", window=window)
        show_slice(axis_row[2], None if image is None else image[z], prediction.array[z], spacing,
                   f"prediction: {metric} {value:.3f}" if value is not None else "prediction", contour=truth.array[z],
                   window=window)
    figure.tight_layout()
    return figure


def lesion_errors(rows: Sequence[Mapping], case_files: Mapping[str, CaseFiles], ratio: float = 1.5,
                  lesion_label: int = LESION_LABEL) -> Table:
    """Reference and predicted lesion volume (ml) of every case and what went wrong: ``missed`` (no
    lesion predicted), ``spurious`` (a lesion where the reference has none), ``over-segmented`` or
    ``under-segmented`` (predicted volume more than ``ratio`` times, or less than 1/``ratio`` of, the
    reference's), else ``ok``; the errors first, largest volume error first."""
    out = []
    for row in rows:
        files = case_files[row["case_id"]]
        truth = read_volume(files.truth)
        voxel_ml = float(np.prod(truth.spacing)) / 1000.0
        true_ml = float((truth.array == lesion_label).sum()) * voxel_ml
        pred_ml = float((read_volume(files.prediction).array == lesion_label).sum()) * voxel_ml
        if true_ml > 0 and pred_ml == 0:
            kind = "missed"
        elif true_ml == 0 and pred_ml > 0:
            kind = "spurious"
        elif true_ml > 0 and pred_ml > ratio * true_ml:
            kind = "over-segmented"
        elif true_ml > 0 and pred_ml < true_ml / ratio:
            kind = "under-segmented"
        else:
            kind = "ok"
        out.append({"case_id": row["case_id"], "subtype": row.get("subtype"), "error": kind,
                    "reference_ml": true_ml, "predicted_ml": pred_ml,
                    "volume_ratio": pred_ml / true_ml if true_ml > 0 else None, "lesion_dice": row.get("lesion_dice")})
    out.sort(key=lambda r: (r["error"] == "ok", -abs(r["predicted_ml"] - r["reference_ml"])))
    return Table(out, title=f"lesion volume errors (over or under by more than {ratio:g}x)")
