"""The summary of an evaluation's per-case rows (summary.json): each segmentation metric's mean, median
and misses with a percentile-bootstrap 95% interval over cases, the per-subtype means, and the subtype
classification scores with theirs; and how each number is computed, for the file's reader."""

from __future__ import annotations

import numpy as np

from pancreas_mtl.evaluation.metrics import classification_scores, confusion_matrix, finite_mean

SEGMENTATION_METRICS = ("whole_pancreas_dice", "lesion_dice", "whole_pancreas_nsd", "lesion_nsd",
                        "whole_pancreas_hd95", "lesion_hd95")
STRUCTURES = ("whole_pancreas", "lesion")  # each has a ``{structure}_miss`` flag per case


# --- bootstrap --------------------------------------------------------------------------------------

def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the finite samples; NaN, NaN without any."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not samples.size:
        return float("nan"), float("nan")
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _bootstrap_means(values: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Mean of the defined values of each resample (rows of case indices); NaN where none is defined."""
    picked = values[resamples]
    defined = np.isfinite(picked)
    counts = defined.sum(axis=1)
    sums = np.where(defined, picked, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(sums), np.nan), where=counts > 0)


# --- the scores -------------------------------------------------------------------------------------

def summarise(rows: list[dict], probabilities: np.ndarray | None, bootstrap: int = 1000, seed: int = 0,
              num_subtypes: int = 3) -> dict:
    """Means with percentile-bootstrap 95% intervals, per-subtype means, and the classification scores.

    Args:
        rows: per-case dicts with the SEGMENTATION_METRICS, the ``{structure}_miss`` flags (a missing flag
            counts as no miss), ``subtype`` and ``predicted_subtype`` (or None).
        probabilities: (N, K) subtype probabilities in the order of ``rows``, or None.
        num_subtypes: the declared subtypes the macro scores average over.
    """
    rng = np.random.default_rng(seed)
    n = len(rows)
    misses = {structure: int(sum(bool(row.get(f"{structure}_miss")) for row in rows)) for structure in STRUCTURES}
    summary: dict = {"num_cases": n, **{f"{structure}_misses": count for structure, count in misses.items()},
                     "bootstrap": {"resamples": bootstrap, "seed": seed, "interval": 0.95},
                     "segmentation": {}, "per_subtype": {}}
    resamples = rng.integers(0, n, size=(bootstrap, n))
    for name in SEGMENTATION_METRICS:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        low, high = _interval(_bootstrap_means(values, resamples)) if bootstrap > 0 else (float("nan"),) * 2
        defined = values[np.isfinite(values)]
        summary["segmentation"][name] = {
            "mean": finite_mean(values), "median": float(np.median(defined)) if defined.size else float("nan"),
            "ci_low": low, "ci_high": high, "undefined": int(n - defined.size)}
        if name.endswith("_hd95"):  # the misses are in the mean at the image diagonal: say how many
            summary["segmentation"][name]["misses"] = misses[name[: -len("_hd95")]]
    for subtype in sorted({row["subtype"] for row in rows if row["subtype"] is not None}):
        chosen = [row for row in rows if row["subtype"] == subtype]
        summary["per_subtype"][str(subtype)] = {
            "num_cases": len(chosen), **{name: finite_mean([r[name] for r in chosen]) for name in SEGMENTATION_METRICS}}

    labelled = np.array([i for i, row in enumerate(rows)
                         if row["subtype"] is not None and row.get("predicted_subtype") is not None], dtype=int)
    if labelled.size:
        targets = np.array([rows[i]["subtype"] for i in labelled])
        predicted = np.array([rows[i]["predicted_subtype"] for i in labelled])
        scored = probabilities[labelled] if probabilities is not None else None
        boot: dict[str, list[float]] = {}
        for sample in rng.integers(0, labelled.size, size=(bootstrap, labelled.size)):
            resampled = classification_scores(targets[sample], predicted[sample],
                                              None if scored is None else scored[sample], num_subtypes)
            for key in ("macro_f1", "balanced_accuracy", "macro_auroc"):
                if key in resampled:
                    boot.setdefault(key, []).append(resampled[key])
        summary["classification"] = {
            "num_cases": int(labelled.size), "declared_subtypes": int(num_subtypes),
            **classification_scores(targets, predicted, scored, num_subtypes),
            "ci": {key: dict(zip(("low", "high"), _interval(np.array(values)))) for key, values in boot.items()},
            "confusion_matrix": confusion_matrix(targets, predicted, num_subtypes).tolist()}
    return summary


def conventions(num_subtypes: int) -> dict[str, str]:
    """How each number in summary.json was computed, for the reader of the file."""
    return {
        "grid": "metrics on the reference file's grid and voxel spacing; predictions must share shape and affine",
        "miss": "a miss is a case where exactly one of prediction and reference is empty (missed or spurious); "
                "it scores the worst value (Dice 0, NSD 0, HD95 the image diagonal), is flagged by *_miss in "
                "per_case.csv and counted as *_misses",
        "dice": "both masks empty: 1.0; one empty: 0.0",
        "nsd": "normalised surface Dice of border voxels at tolerance_mm; both empty: 1.0, one empty: 0.0",
        "hd95": "max of the two directed 95th percentiles of border distances (mm); both empty: 0.0, one empty "
                "(a miss): the image diagonal in mm, sqrt(sum((shape * spacing)^2)), included in the mean",
        "classification": f"macro F1 over the {num_subtypes} declared subtypes (num_subtypes; a subtype in "
                          "neither reference nor prediction scores 0, scikit-learn's zero_division=0); balanced "
                          "accuracy over reference subtypes; one-vs-rest AUROC, NaN for a subtype absent from "
                          "the reference, macro AUROC over the defined ones",
        "ci": "percentile bootstrap over cases, 2.5 and 97.5 percentiles",
    }
