"""Looking at evaluated cases: where each case's image, reference and prediction are, the worst cases,
the slice with the most lesion, the worst-case montage, and lesions missed or over-segmented.

Arrays are (Z, Y, X) as :func:`~pancreas_mtl.raw.io.read_volume` returns them; a slice is (Y, X).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.errors import DatasetError
from pancreas_mtl.raw.io import image_suffix, read_volume, strip_suffix
from pancreas_mtl.raw.layout import CHANNEL_FILE, discover, image_file_name, is_dataset_root
from pancreas_mtl.evaluation.evaluate import reference_cases
from pancreas_mtl.evaluation.metrics import LESION_LABEL
from pancreas_mtl.evaluation.plots import new_figure
from pancreas_mtl.tables import Table

# CT soft-tissue window (level 40, width 400 HU), the radiologist's view of the pancreas
SOFT_TISSUE_WINDOW = (-160.0, 240.0)


@dataclass(frozen=True)
class CaseFiles:
    """One evaluated case's files: the image (first channel; None when it cannot be found), the reference
    mask and the predicted mask."""

    case_id: str
    image: Path | None
    truth: Path
    prediction: Path


def _images_in(folder: Path) -> dict[str, Path]:
    """{case: channel-0 image} of a folder and its subtype folders."""
    found = {}
    for path in sorted([*folder.glob("*"), *folder.glob("subtype*/*")]):
        match = CHANNEL_FILE.match(strip_suffix(path))
        if image_suffix(path) and match and int(match["channel"]) == 0:
            found[match["case"]] = path
    return found


def _images_from_layout(gt: Path, num_subtypes: int) -> dict[str, Path]:
    """{case: channel-0 image} of the dataset ``gt`` is (or whose folder it is in, as test_labels/), or {}."""
    for root in (gt, gt.parent):
        if is_dataset_root(root):
            try:
                return {case.case_id: case.image_paths[0] for case in discover(root, num_subtypes).cases}
            except DatasetError:
                return {}
    return {}


def find_case_files(pred: str | Path, gt: str | Path, cases: Sequence[str] | None = None,
                    images: str | Path | None = None, subtypes: str | Path | None = None,
                    num_subtypes: int = 3) -> dict[str, CaseFiles]:
    """{case: CaseFiles} of an evaluation's inputs (``evaluate``'s ``pred``, ``gt``, ``subtypes``).

    The image ``{case}_0000{ending}`` is looked for in ``images`` (and its ``subtype*/`` folders), beside
    the reference mask, then in the dataset ``gt`` is or lies in (the synthetic set's ``test_labels/``
    finds ``test/``); a case without one gets ``image=None``.
    """
    pred, gt = Path(pred).expanduser(), Path(gt).expanduser()
    if not pred.is_dir():
        raise FileNotFoundError(f"prediction folder {pred} not found")
    reference = reference_cases(gt, subtypes, None, num_subtypes)
    cases = sorted(reference) if cases is None else list(cases)
    unknown = [case for case in cases if case not in reference]
    if unknown:
        raise ValueError(f"{gt}: no reference mask for {len(unknown)} case(s): {', '.join(unknown[:20])}")
    predictions = {strip_suffix(p): p for p in pred.iterdir() if p.is_file() and image_suffix(p)}
    missing = [case for case in cases if case not in predictions]
    if missing:
        raise ValueError(f"{pred}: no predicted mask for {len(missing)} case(s): {', '.join(missing[:20])}")
    given = _images_in(Path(images).expanduser()) if images else {}
    layout: dict[str, Path] | None = None
    files = {}
    for case in cases:
        truth = reference[case][0]
        image = given.get(case)
        if image is None:
            beside = truth.with_name(image_file_name(case, 0, image_suffix(truth) or ".nii.gz"))
            image = beside if beside.is_file() else None
        if image is None:
            layout = _images_from_layout(gt, num_subtypes) if layout is None else layout
            image = layout.get(case)
        files[case] = CaseFiles(case, image, truth, predictions[case])
    return files


def worst_cases(rows: Sequence[Mapping], metric: str = "lesion_dice", count: int = 4) -> list[Mapping]:
    """The ``count`` rows with the worst ``metric`` (highest for HD95, else lowest), undefined values last."""
    higher_is_worse = metric.endswith("_hd95")

    def badness(row: Mapping) -> float:
        value = row.get(metric)
        if value is None or not np.isfinite(value):
            return float("inf")
        return -value if higher_is_worse else value

    return sorted(rows, key=badness)[:count]


def lesion_slice(truth: np.ndarray, prediction: np.ndarray, lesion_label: int = LESION_LABEL) -> int:
    """The axial slice (z) with the most lesion in the reference, else in the prediction, else the most
    foreground in either, else the middle. truth, prediction: (Z, Y, X) label maps."""
    for mask in (truth == lesion_label, prediction == lesion_label, (truth > 0) | (prediction > 0)):
        area = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if area.max() > 0:
            return int(area.argmax())
    return truth.shape[0] // 2


def show_slice(axis, image: np.ndarray | None, labels: np.ndarray, spacing_yx: Sequence[float],
               title: str = "", contour: np.ndarray | None = None, lesion_label: int = LESION_LABEL,
               window: Sequence[float] | None = SOFT_TISSUE_WINDOW) -> None:
    """An axial (Y, X) slice on ``axis``: the image in grey between ``window`` (low, high; None: its 1st and
    99th percentile), pancreas in green and lesion in red, filled; ``contour`` labels drawn as outlines on
    top (the reference over a prediction)."""
    aspect = float(spacing_yx[0]) / float(spacing_yx[1])
    if image is not None:
        low, high = window if window is not None else np.percentile(image, [1, 99])
        axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
    else:
        axis.imshow(np.zeros(labels.shape), cmap="gray", aspect=aspect)
        axis.text(0.5, 0.95, "image not found", color="white", ha="center", va="top", fontsize=7,
                  transform=axis.transAxes)
    overlay = np.zeros((*labels.shape, 4))
    overlay[labels == 1] = (0.2, 0.8, 0.2, 0.35)
    overlay[labels == lesion_label] = (0.9, 0.1, 0.1, 0.5)
    axis.imshow(overlay, aspect=aspect, interpolation="nearest")
    if contour is not None:
        for mask, colour in ((contour > 0, "lime"), (contour == lesion_label, "red")):
            if mask.any() and not mask.all():
                axis.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_title(title, fontsize=8)
    axis.set_axis_off()


def worst_cases_figure(rows: Sequence[Mapping], case_files: Mapping[str, CaseFiles], metric: str = "lesion_dice",
                       window: Sequence[float] | None = SOFT_TISSUE_WINDOW):
    """One row per case of ``rows``: image, reference, prediction (with the reference's outlines) on the
    slice with the most lesion; ``window`` as :func:`show_slice`'s."""
    figure = new_figure(figsize=(9, 3 * max(len(rows), 1)))
    axes = np.atleast_2d(figure.subplots(max(len(rows), 1), 3))
    for axis_row, row in zip(axes, rows):
        files = case_files[row["case_id"]]
        truth, prediction = read_volume(files.truth), read_volume(files.prediction)
        image = read_volume(files.image).array if files.image is not None else None
        z = lesion_slice(truth.array, prediction.array)
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
