"""What every evaluation figure shares: an empty matplotlib figure, its atomic PNG file, the CT window,
the mask colours and an axial slice with its masks drawn on it.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot: no global state or backend, so the
same function draws for a PNG, in a training run and in a notebook (which shows a returned figure).
A slice is (Y, X), as :func:`~pancreas_mtl.raw.io.read_volume`'s (Z, Y, X) arrays give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pancreas_mtl.evaluation.metrics import LESION_LABEL

# CT soft-tissue window (level 40, width 400 HU), the radiologist's view of the pancreas
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
# filled masks (red, green, blue, alpha); outlines are drawn in OUTLINE_COLOURS
PANCREAS_RGBA = (0.2, 0.8, 0.2, 0.35)
LESION_RGBA = (0.9, 0.1, 0.1, 0.5)
OUTLINE_COLOURS = {"pancreas": "lime", "lesion": "red"}


def new_figure(**kwargs):
    """An empty ``Figure`` (``figsize=...``); an ImportError saying what to install without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the evaluation plots need matplotlib: pip install matplotlib, or pass plots=false "
                          "(per_case.csv and summary.json are written already)") from error
    return Figure(**kwargs)


def save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG atomically (a temporary name, then a rename); the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path


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
    overlay[labels == 1] = PANCREAS_RGBA
    overlay[labels == lesion_label] = LESION_RGBA
    axis.imshow(overlay, aspect=aspect, interpolation="nearest")
    if contour is not None:
        for mask, colour in ((contour > 0, OUTLINE_COLOURS["pancreas"]),
                             (contour == lesion_label, OUTLINE_COLOURS["lesion"])):
            if mask.any() and not mask.all():
                axis.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_title(title, fontsize=8)
    axis.set_axis_off()
