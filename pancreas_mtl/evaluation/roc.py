"""One-vs-rest ROC curves of the subtype probabilities: the curves the evaluation PNG, the W&B charts and
the notebooks draw."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of thresholding ``scores``, from (0, 0) to (1, 1); tied
    scores are one threshold (one point)."""
    scores, positives = np.asarray(scores), np.asarray(positives)
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores[order])), hits.size - 1]
    tpr = np.r_[0.0, np.cumsum(hits)[last_of_ties] / max(hits.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(~hits)[last_of_ties] / max((~hits).sum(), 1)]
    return fpr, tpr


def subtype_roc_curves(probabilities: np.ndarray, subtypes: Sequence[int | None]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{k: (fpr, tpr)}``: subtype k's probability against the rest, over the cases with a reference subtype.

    Args:
        probabilities: (N, K) subtype probabilities.
        subtypes: (N,) reference subtypes; a case whose subtype is None is left out.

    A subtype that no case, or every case, has gets no curve (it has no negatives or no positives).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    known = np.array([subtype is not None for subtype in subtypes], dtype=bool)
    if probabilities.ndim != 2 or probabilities.shape[0] != known.size:
        raise ValueError(f"expected (N, K) probabilities and N subtypes, got {probabilities.shape} and {known.size}")
    targets = np.array([subtype for subtype in subtypes if subtype is not None], dtype=np.int64)
    scores = probabilities[known]
    return {k: roc_curve(scores[:, k], targets == k) for k in range(scores.shape[1])
            if 0 < (targets == k).sum() < targets.size}
