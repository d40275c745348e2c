"""One validation's per-case results as W&B media: the table of cases, the worst cases' slices with
toggleable ground-truth and prediction mask layers, and the subtype ROC curves.

Called through :func:`pancreas_mtl.training.validation_media.log_validation_cases`, which catches any error: a
dashboard is never a reason to stop training. Every key is logged with ``trainer/global_step``, the
x-axis Lightning's W&B logger sets for all metrics, so the panels line up with the ``val/*`` curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pancreas_mtl.evaluation.roc import subtype_roc_curves
from pancreas_mtl.evaluation.selection import worst_cases
from pancreas_mtl.tracking.settings import roc_plot, wandb_table

CASES_KEY = "val/cases"
WORST_KEY = "val/worst_cases"
ROC_KEY = "val/roc"


def _probabilities(case: Mapping) -> np.ndarray | None:
    value = case.get("probabilities")
    if value is None:
        return None
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)


def case_rows(cases: Sequence[Mapping], epoch: int) -> tuple[list[str], list[list]]:
    """(columns, rows) of the per-case table: epoch, case, subtype, predicted subtype, its probabilities
    ``p0..p{K-1}`` (when the network has a head), pancreas and lesion Dice."""
    probabilities = [_probabilities(case) for case in cases]
    num_subtypes = next((p.size for p in probabilities if p is not None), 0)
    columns = ["epoch", "case", "subtype", "predicted_subtype", *(f"p{k}" for k in range(num_subtypes)),
               "whole_pancreas_dice", "lesion_dice"]
    rows = []
    for case, p in zip(cases, probabilities):
        predicted = None if p is None else int(np.argmax(p))
        scores = [None] * num_subtypes if p is None else [float(v) for v in p]
        rows.append([int(epoch), str(case["case_id"]), case.get("subtype"), predicted, *scores,
                     float(case["whole_pancreas_dice"]), float(case["lesion_dice"])])
    return columns, rows


def _padded(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(Y, X) padded with zeros (black, background) at the bottom and right to ``shape``."""
    array = np.asarray(array, dtype=np.uint8)
    return np.pad(array, [(0, shape[0] - array.shape[0]), (0, shape[1] - array.shape[1])])


def masked_image(case: Mapping, labels: Mapping[str, int], epoch: int, shape: tuple[int, int] | None = None):
    """A ``wandb.Image`` of the case's kept slice with two mask layers, ``ground_truth`` and ``prediction``,
    each with the plan's class labels (the W&B UI toggles them and each class on their own); padded to
    ``shape`` (Y, X), as W&B shows the images of one key at one size."""
    import wandb

    view = case["slice"]
    shape = shape or tuple(view["image"].shape)
    class_labels = {int(value): str(name) for name, value in labels.items()}
    caption = (f"{case['case_id']} z={view['z']} epoch {epoch}: pancreas Dice {float(case['whole_pancreas_dice']):.3f}, "
               f"lesion Dice {float(case['lesion_dice']):.3f}")
    return wandb.Image(_padded(view["image"], shape), caption=caption, masks={
        "ground_truth": {"mask_data": _padded(view["true"], shape), "class_labels": class_labels},
        "prediction": {"mask_data": _padded(view["pred"], shape), "class_labels": class_labels}})


def roc_curves(cases: Sequence[Mapping]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"subtype{k}": (fpr, tpr)}``: :func:`~pancreas_mtl.evaluation.roc.subtype_roc_curves` of the cases
    with a subtype and probabilities."""
    pairs = [(case.get("subtype"), _probabilities(case)) for case in cases]
    pairs = [(subtype, p) for subtype, p in pairs if subtype is not None and p is not None]
    if not pairs:
        return {}
    curves = subtype_roc_curves(np.stack([p for _, p in pairs]), [subtype for subtype, _ in pairs])
    return {f"subtype{k}": curve for k, curve in curves.items()}


def log_validation_media(run: Any, cases: Sequence[Mapping], step: int, epoch: int, labels: Mapping[str, int],
                         num_worst: int) -> None:
    """Log the table (``val/cases``), the worst cases (``val/worst_cases``) and the ROC chart (``val/roc``)
    of one validation to the W&B ``run``; see :func:`pancreas_mtl.training.validation_media.log_validation_cases`."""
    payload: dict[str, Any] = {CASES_KEY: wandb_table(*case_rows(cases, epoch))}
    # the rule of the evaluation's worst_cases.png, among the cases that kept a slice
    worst = worst_cases([case for case in cases if case.get("slice") is not None], "lesion_dice", num_worst)
    if worst:
        shape = tuple(int(max(case["slice"]["image"].shape[axis] for case in worst)) for axis in (0, 1))
        payload[WORST_KEY] = [masked_image(case, labels, epoch, shape) for case in worst]
    curves = roc_curves(cases)
    if curves:
        payload[ROC_KEY] = roc_plot(curves, title=f"subtype ROC, validation epoch {epoch}")
    run.log({**payload, "trainer/global_step": step})
