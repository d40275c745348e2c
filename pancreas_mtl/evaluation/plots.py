"""Evaluation plots (PNG): Dice per subtype, confusion matrix, one-vs-rest ROC curves. Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the evaluation plots need matplotlib: pip install matplotlib, or pass plots=false "
                          "(per_case.csv and summary.json are written already)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of thresholding ``scores``, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores[order])), hits.size - 1]
    tpr = np.r_[0.0, np.cumsum(hits)[last_of_ties] / max(hits.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(~hits)[last_of_ties] / max((~hits).sum(), 1)]
    return fpr, tpr


def write_plots(out: Path, rows: list[dict], probabilities: np.ndarray | None, summary: dict) -> list[Path]:
    """``dice_by_subtype.png``; with subtypes ``confusion_matrix.png``; with probabilities ``roc_curves.png``."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    groups = sorted({row["subtype"] for row in rows}, key=lambda s: (s is None, s))
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for axis, metric, title in zip(axes, ("whole_pancreas_dice", "lesion_dice"), ("whole pancreas", "lesion")):
        data = [[row[metric] for row in rows if row["subtype"] == group] for group in groups]
        axis.boxplot(data, showfliers=False)
        for position, values in enumerate(data, start=1):
            jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(values))
            axis.scatter(position + jitter, values, s=10, alpha=0.6)
        axis.set_xticks(range(1, len(groups) + 1), [f"subtype {g}" if g is not None else "unknown" for g in groups])
        axis.set_title(f"{title} Dice")
        axis.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    written.append(_save(figure, out / "dice_by_subtype.png", plt))
    scores = summary.get("classification")
    if scores:
        matrix = np.array(scores["confusion_matrix"])
        figure, axis = plt.subplots(figsize=(4.2, 3.8))
        axis.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center",
                      color="white" if count > matrix.max() / 2 else "black")
        axis.set_xlabel("predicted subtype")
        axis.set_ylabel("reference subtype")
        axis.set_xticks(range(len(matrix)))
        axis.set_yticks(range(len(matrix)))
        axis.set_title(f"macro F1 {scores['macro_f1']:.3f} over {len(matrix)} subtypes")
        figure.tight_layout()
        written.append(_save(figure, out / "confusion_matrix.png", plt))
    if probabilities is not None:
        known = np.array([row["subtype"] is not None for row in rows])
        targets = np.array([row["subtype"] if row["subtype"] is not None else -1 for row in rows])[known]
        figure, axis = plt.subplots(figsize=(4.5, 4.2))
        for k in range(probabilities.shape[1]):
            if 0 < (targets == k).sum() < targets.size:
                fpr, tpr = roc_curve(probabilities[known, k], targets == k)
                axis.plot(fpr, tpr, label=f"subtype {k} (AUROC {scores.get(f'auroc_{k}', float('nan')):.3f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.set_title("one-vs-rest ROC")
        axis.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        written.append(_save(figure, out / "roc_curves.png", plt))
    return written


def _save(figure, path: Path, plt) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path
