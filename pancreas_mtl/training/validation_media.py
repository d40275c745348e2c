"""What validation shows: overlays of a case's axial slice, the per-case table, the worst cases and the
confusion matrix, sent to the run's loggers at best effort.

Overlays are drawn as numpy arrays, written as PNG files with Pillow (which matplotlib, a dependency,
installs) and handed to TensorBoard; W&B gets each validation's per-case table and its worst cases as
images with toggleable mask layers instead (:mod:`pancreas_mtl.tracking.media`). Nothing here may stop
a training run: image and table logging catch their errors and warn once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pancreas_mtl.evaluation.selection import shown_slice
from pancreas_mtl.files import atomic_path
from pancreas_mtl.planning.plan import LESION_LABEL
from pancreas_mtl.tracking.settings import confusion_plot, wandb_table

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# --- images -----------------------------------------------------------------------------------------

PANCREAS_COLOUR = np.array([40, 200, 60], dtype=np.float32)
LESION_COLOUR = np.array([235, 40, 40], dtype=np.float32)


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as an 8-bit RGB PNG (atomically; the folder is created)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape} {rgb.dtype}")
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def _contour(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def grey_levels(image: np.ndarray) -> np.ndarray:
    """(Y, X) intensities as uint8 grey levels between their 1st and 99th percentiles."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    return (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255.0).round().astype(np.uint8)


def validation_slice(image: Any, true_labels: np.ndarray, pred_labels: np.ndarray,
                     lesion_label: int = LESION_LABEL) -> dict[str, Any]:
    """The axial slice of a validation case that overlays show (the one
    :func:`~pancreas_mtl.evaluation.selection.shown_slice` picks, as the evaluation's figures do), small
    enough to keep until the epoch ends, when the worst cases are known.

    Args:
        image: (Z, Y, X) intensities, a numpy array or a tensor on any device (only the slice is copied).
        true_labels, pred_labels: (Z, Y, X) label maps.

    Returns ``{"z": int, "image": (Y, X) uint8 grey levels, "true": (Y, X) uint8, "pred": (Y, X) uint8}``, or
    None (with a warning, once) when the slice cannot be taken: a picture never stops validation.
    """
    try:
        z = shown_slice(true_labels, pred_labels, lesion_label)
        plane = image[z]
        if hasattr(plane, "detach"):
            plane = plane.detach().float().cpu().numpy()
        return {"z": z, "image": grey_levels(plane), "true": np.asarray(true_labels[z], dtype=np.uint8),
                "pred": np.asarray(pred_labels[z], dtype=np.uint8)}
    except Exception as error:  # noqa: BLE001
        _warn_once("slice", f"could not keep a validation slice for the W&B images ({type(error).__name__}: {error})")
        return None


def render_overlay(image: np.ndarray, true_labels: np.ndarray, pred_labels: np.ndarray,
                   lesion_label: int = LESION_LABEL, min_size: int = 256) -> np.ndarray:
    """Three panels of one axial slice: the image, the reference filled, the prediction filled with the
    reference's contours on top (pancreas green, lesion red).

    Args:
        image: (Y, X) intensities, shown between their 1st and 99th percentiles.
        true_labels, pred_labels: (Y, X) label maps (0 background, 1 pancreas, 2 lesion).
        min_size: pixels are repeated so that the longer side is at least this large.

    Returns (H, 3 W, 3) uint8.
    """
    base = np.repeat(grey_levels(image)[..., None].astype(np.float32), 3, axis=2)

    def filled(labels: np.ndarray) -> np.ndarray:
        out = base.copy()
        for value, colour, alpha in ((1, PANCREAS_COLOUR, 0.35), (lesion_label, LESION_COLOUR, 0.5)):
            mask = labels == value
            out[mask] = (1 - alpha) * out[mask] + alpha * colour
        return out

    with_contours = filled(pred_labels)
    for mask, colour in ((true_labels > 0, PANCREAS_COLOUR), (true_labels == lesion_label, LESION_COLOUR)):
        with_contours[_contour(mask)] = colour
    panels = np.concatenate([base, filled(true_labels), with_contours], axis=1)
    scale = max(1, int(np.ceil(min_size / max(image.shape))))
    panels = panels.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.clip(panels, 0, 255).astype(np.uint8)


def log_image(loggers: Sequence, key: str, rgb: np.ndarray, step: int) -> None:
    """Send an (H, W, 3) uint8 image to every TensorBoard logger; others are skipped (W&B gets the worst
    cases with mask layers from :func:`log_validation_cases` instead). Never raises."""
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind == "TensorBoardLogger":
                logger.experiment.add_image(key, rgb, global_step=step, dataformats="HWC")
        except Exception as error:  # noqa: BLE001 - images are a convenience, never a reason to stop
            _warn_once(f"image:{kind}", f"could not log validation images to {kind} ({type(error).__name__}: "
                                        f"{error}); PNG files are still written to the run folder")


def log_validation_cases(loggers: Sequence, cases: Sequence[Mapping], step: int, epoch: int,
                         labels: Mapping[str, int], num_worst: int) -> None:
    """One validation's per-case results to every W&B logger: the table of cases, the ``num_worst`` worst
    cases' slices with ground-truth and prediction mask layers, and the subtype ROC curves
    (:func:`pancreas_mtl.tracking.media.log_validation_media`); other loggers are skipped. Never raises.

    Args:
        cases: ``{case_id, subtype, whole_pancreas_dice, lesion_dice, probabilities ((K,) or None), slice
            (:func:`validation_slice` or None)}`` per case.
        labels: the plan's ``{name: value}`` segmentation labels, naming the mask classes.
    """
    for logger in loggers:
        kind = type(logger).__name__
        if kind != "WandbLogger":
            continue
        try:
            from pancreas_mtl.tracking.media import log_validation_media

            log_validation_media(logger.experiment, cases, step, epoch, labels, num_worst)
        except Exception as error:  # noqa: BLE001 - tables and images are a convenience, never a reason to stop
            _warn_once(f"cases:{kind}", f"could not log the validation cases to {kind} ({type(error).__name__}: "
                                        f"{error})")


# --- tables -----------------------------------------------------------------------------------------

def format_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """A fixed-width text table of a (K, K) confusion matrix; rows are true classes, columns predicted."""
    k = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    width = max(6, *(len(n) for n in names), *(len(str(int(v))) for v in matrix.ravel()))
    lines = ["true \\ pred".ljust(12) + "".join(n.rjust(width + 1) for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(12) + "".join(str(int(v)).rjust(width + 1) for v in row))
    return "\n".join(lines)


def log_confusion_matrix(loggers: Sequence, key: str, matrix: np.ndarray, step: int,
                         class_names: Sequence[str] | None = None) -> None:
    """The confusion matrix as a W&B table and plot, or TensorBoard text; other loggers are skipped. Never raises."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(matrix.shape[0])]
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind == "WandbLogger":
                rows = [[names[t], names[p], int(matrix[t, p])] for t in range(len(names)) for p in range(len(names))]
                logger.experiment.log({f"{key}_table": wandb_table(["true", "predicted", "cases"], rows),
                                       key: confusion_plot(matrix, names), "trainer/global_step": step})
            elif kind == "TensorBoardLogger":
                text = "    " + format_confusion_matrix(matrix, names).replace("\n", "\n    ")
                logger.experiment.add_text(key, text, global_step=step)
        except Exception as error:  # noqa: BLE001
            _warn_once(f"confusion:{kind}", f"could not log the confusion matrix to {kind} "
                                            f"({type(error).__name__}: {error})")
