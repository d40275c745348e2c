"""What a picture of cases shows: the worst cases, and the axial slice of a case. One rule each, used by
the validation overlays and W&B images of training, the evaluation's worst_cases.png and the notebooks,
so one case is shown the same way everywhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pancreas_mtl.evaluation.metrics import LESION_LABEL


def worst_cases(rows: Sequence[Mapping], metric: str = "lesion_dice", count: int = 4) -> list[Mapping]:
    """The ``count`` rows with the worst ``metric``: highest first for ``*_hd95``, else lowest first; rows
    where it is undefined (None, NaN, absent) last; ties by ``case_id``."""
    higher_is_worse = metric.endswith("_hd95")

    def badness(row: Mapping) -> tuple[float, str]:
        value = row.get(metric)
        value = float("nan") if value is None else float(value)
        if not np.isfinite(value):
            return float("inf"), str(row.get("case_id"))
        return (-value if higher_is_worse else value), str(row.get("case_id"))

    return sorted(rows, key=badness)[:max(int(count), 0)]


def shown_slice(truth: np.ndarray, prediction: np.ndarray, lesion_label: int = LESION_LABEL) -> int:
    """The axial slice (z) to show of a case: the one with the most reference lesion voxels; without a
    reference lesion, the most predicted lesion voxels; without either, the most reference foreground
    (pancreas or lesion); else the most predicted foreground; else the middle slice. The first such
    slice on a tie.

    Args:
        truth, prediction: (Z, Y, X) label maps of the same shape (0 background, 1 pancreas, ``lesion_label``).
    """
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"reference and prediction differ in shape (z, y, x): {truth.shape} and {prediction.shape}")
    for mask in (truth == lesion_label, prediction == lesion_label, truth > 0, prediction > 0):
        area = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if area.size and area.max() > 0:
            return int(area.argmax())
    return truth.shape[0] // 2
