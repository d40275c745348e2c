"""Evaluation figures: Dice, NSD and HD95 per subtype, the confusion matrix, one-vs-rest ROC curves, the
reliability diagram of the subtype probabilities, and ``write_plots`` saving them (with the worst-case
montage of :mod:`pancreas_mtl.evaluation.case_views`) beside per_case.csv. Needs matplotlib; figures are
made as :mod:`pancreas_mtl.evaluation.figures` says.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from pancreas_mtl.evaluation.calibration import reliability_bins
from pancreas_mtl.evaluation.case_views import worst_cases_figure
from pancreas_mtl.evaluation.figures import new_figure, save_figure
from pancreas_mtl.evaluation.roc import subtype_roc_curves
from pancreas_mtl.evaluation.selection import worst_cases

# (per-case column, title, y limits or None) of the per-subtype distributions
METRIC_PANELS = {
    "dice": (("whole_pancreas_dice", "whole pancreas Dice", (-0.02, 1.02)), ("lesion_dice", "lesion Dice", (-0.02, 1.02))),
    "nsd": (("whole_pancreas_nsd", "whole pancreas NSD", (-0.02, 1.02)), ("lesion_nsd", "lesion NSD", (-0.02, 1.02))),
    "hd95": (("whole_pancreas_hd95", "whole pancreas HD95 (mm)", None), ("lesion_hd95", "lesion HD95 (mm)", None)),
}


def _subtype_groups(rows: Sequence[dict]) -> list:
    return sorted({row["subtype"] for row in rows}, key=lambda s: (s is None, s))


def metric_by_subtype_figure(rows: Sequence[dict], kind: str = "dice"):
    """Box plots with the cases on top, per subtype, of the whole-pancreas and lesion ``kind`` (dice, nsd, hd95).

    HD95 of a miss is the image diagonal (evaluate's convention): those cases are drawn as crosses.
    """
    if kind not in METRIC_PANELS:
        raise ValueError(f"unknown metric kind {kind!r}; choose one of {', '.join(METRIC_PANELS)}")
    groups = _subtype_groups(rows)
    figure = new_figure(figsize=(9, 4))
    axes = figure.subplots(1, 2, sharey=kind != "hd95")
    for axis, (metric, title, limits) in zip(axes, METRIC_PANELS[kind]):
        structure, miss_label = metric.rsplit("_", 1)[0], "miss"
        data = [[row[metric] for row in rows if row["subtype"] == group and np.isfinite(row[metric])]
                for group in groups]
        axis.boxplot(data, showfliers=False)
        for position, group in enumerate(groups, start=1):
            chosen = [row for row in rows if row["subtype"] == group and np.isfinite(row[metric])]
            jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(chosen))
            missed = np.array([bool(row.get(f"{structure}_miss")) for row in chosen], dtype=bool)
            values = np.array([row[metric] for row in chosen], dtype=np.float64)
            axis.scatter(position + jitter[~missed], values[~missed], s=10, alpha=0.6)
            if missed.any():
                axis.scatter(position + jitter[missed], values[missed], s=24, marker="x", color="black",
                             label=miss_label)
                miss_label = None  # one legend entry
        axis.set_xticks(range(1, len(groups) + 1), [f"subtype {g}" if g is not None else "unknown" for g in groups])
        axis.set_title(title)
        if limits:
            axis.set_ylim(*limits)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def confusion_matrix_figure(matrix: np.ndarray, title: str = ""):
    """Counts of reference (rows) against predicted (columns) subtypes."""
    matrix = np.asarray(matrix)
    figure = new_figure(figsize=(4.2, 3.8))
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    axis.set_xlabel("predicted subtype")
    axis.set_ylabel("reference subtype")
    axis.set_xticks(range(len(matrix)))
    axis.set_yticks(range(len(matrix)))
    axis.set_title(title)
    figure.tight_layout()
    return figure


def _known(rows: Sequence[dict], probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, reference subtypes) of the cases with a reference subtype."""
    known = np.array([row["subtype"] is not None for row in rows], dtype=bool)
    targets = np.array([row["subtype"] if row["subtype"] is not None else -1 for row in rows])
    return np.asarray(probabilities)[known], targets[known]


def roc_figure(rows: Sequence[dict], probabilities: np.ndarray, aurocs: dict | None = None):
    """One-vs-rest ROC curve per subtype that has positives and negatives among the reference subtypes."""
    figure = new_figure(figsize=(4.5, 4.2))
    axis = figure.subplots()
    for k, (fpr, tpr) in subtype_roc_curves(probabilities, [row["subtype"] for row in rows]).items():
        auroc = (aurocs or {}).get(f"auroc_{k}", float("nan"))
        axis.plot(fpr, tpr, label=f"subtype {k} (AUROC {auroc:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("one-vs-rest ROC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def reliability_figure(rows: Sequence[dict], probabilities: np.ndarray, bins: int = 10):
    """Reliability diagram of the predicted subtype's probability: accuracy against confidence per bin,
    with the expected calibration error, and how many cases fall in each bin."""
    scores, targets = _known(rows, probabilities)
    result = reliability_bins(scores, targets, bins)
    figure = new_figure(figsize=(4.5, 5.2))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = (result["edges"][:-1] + result["edges"][1:]) / 2
    width = np.diff(result["edges"])
    filled = result["counts"] > 0
    top.bar(centres[filled], result["accuracy"][filled], width=width[filled] * 0.9, alpha=0.7, label="accuracy")
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    top.scatter(result["confidence"][filled], result["accuracy"][filled], color="black", s=12, zorder=3,
                label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1.02)
    top.set_title(f"subtype calibration (ECE {result['ece']:.3f}, {int(result['counts'].sum())} cases)")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, result["counts"], width=width * 0.9, color="grey")
    bottom.set_xlabel("probability of the predicted subtype")
    bottom.set_ylabel("cases")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    return figure


PLOT_FILES = (*(f"{kind}_by_subtype.png" for kind in METRIC_PANELS), "confusion_matrix.png", "roc_curves.png",
              "reliability.png", "worst_cases.png")  # every PNG write_plots may write


def write_plots(out: Path, rows: list[dict], probabilities: np.ndarray | None, summary: dict,
                case_files: dict | None = None, montage_cases: int = 0, calibration_bins: int = 10,
                skip: Collection[str] = ()) -> list[Path]:
    """``{dice,nsd,hd95}_by_subtype.png``; with subtypes ``confusion_matrix.png``; with probabilities
    ``roc_curves.png`` and ``reliability.png``; with ``case_files`` ({case: CaseFiles}) and
    ``montage_cases`` > 0, ``worst_cases.png`` (lowest lesion Dice: image, reference, prediction).
    File names in ``skip`` (the user's: changed by hand since written) are not written."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {f"{kind}_by_subtype.png": (lambda kind=kind: metric_by_subtype_figure(rows, kind))
               for kind in METRIC_PANELS}
    scores = summary.get("classification")
    if scores:
        matrix = np.array(scores["confusion_matrix"])
        title = f"macro F1 {scores['macro_f1']:.3f} over {len(matrix)} subtypes"
        figures["confusion_matrix.png"] = lambda: confusion_matrix_figure(matrix, title)
    if probabilities is not None and any(row["subtype"] is not None for row in rows):
        figures["roc_curves.png"] = lambda: roc_figure(rows, probabilities, scores or {})
        figures["reliability.png"] = lambda: reliability_figure(rows, probabilities, calibration_bins)
    if case_files and montage_cases > 0:
        worst = worst_cases(rows, "lesion_dice", montage_cases)
        figures["worst_cases.png"] = lambda: worst_cases_figure(worst, case_files, "lesion_dice")
    return [save_figure(draw(), out / name) for name, draw in figures.items() if name not in skip]
