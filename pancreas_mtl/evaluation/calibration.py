"""Calibration of the subtype probabilities: the reliability diagram's bins and the expected calibration error."""

from __future__ import annotations

import numpy as np


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, np.ndarray | float]:
    """Confidence (the predicted subtype's probability) against accuracy in ``bins`` equal-width bins.

    Args:
        probabilities: (N, K) subtype probabilities.
        targets: (N,) reference subtypes.

    Returns {"edges": (bins + 1,), "counts": (bins,), "confidence": (bins,) mean confidence, "accuracy": (bins,)
    share of correct predictions (NaN in an empty bin), "ece": the expected calibration error, the
    count-weighted mean of |accuracy - confidence| (NaN without cases)}.
    """
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets)
    if probabilities.ndim != 2 or probabilities.shape[0] != targets.shape[0]:
        raise ValueError(f"expected (N, K) probabilities and (N,) targets, got {probabilities.shape} and "
                         f"{targets.shape}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = probabilities.max(axis=1) if probabilities.size else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == targets) if probabilities.size else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / counts
    filled = counts > 0
    ece = (float(np.sum(counts[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / counts.sum())
           if counts.sum() else float("nan"))
    return {"edges": edges, "counts": counts, "confidence": mean_confidence, "accuracy": accuracy, "ece": ece}
