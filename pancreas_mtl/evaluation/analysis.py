"""An evaluation folder read back (what ``pancreas-mtl evaluate`` wrote: per_case.csv, summary.json) for
error analysis: typed per-case rows, the subtype probabilities, per-subtype tables, the case files."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pancreas_mtl.evaluation.evaluate import PER_CASE_FILE, SUMMARY_FILE, Evaluation
from pancreas_mtl.evaluation.plots import confusion_matrix_figure, reliability_figure, roc_figure
from pancreas_mtl.evaluation.references import CaseFiles, find_case_files
from pancreas_mtl.evaluation.summary import SEGMENTATION_METRICS
from pancreas_mtl.files import load_json
from pancreas_mtl.tables import Table

INTEGER_COLUMNS = ("subtype", "predicted_subtype", "whole_pancreas_miss", "lesion_miss")


def _cell(column: str, text: str):
    if text == "":
        return None
    if column == "case_id":
        return text
    if column in INTEGER_COLUMNS:
        return int(float(text)) if text not in ("True", "False") else int(text == "True")
    return float(text)


def load_evaluation(folder: str | Path) -> Evaluation:
    """The rows of ``folder/per_case.csv`` (numbers typed, empty cells None), ``summary.json`` and the
    (N, K) subtype probabilities from the rows' ``p0, p1, ...`` columns (None without them)."""
    folder = Path(folder).expanduser()
    for name in (PER_CASE_FILE, SUMMARY_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an evaluation folder: {name} is missing (pancreas-mtl "
                                    f"evaluate pred=... gt=... out={folder} writes it)")
    with open(folder / PER_CASE_FILE, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in ("case_id", "subtype", *SEGMENTATION_METRICS) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{folder / PER_CASE_FILE}: columns {missing} missing; found {reader.fieldnames}")
        rows = [{column: _cell(column, text) for column, text in row.items()} for row in reader]
    columns = sorted((c for c in rows[0] if re.fullmatch(r"p\d+", c)), key=lambda c: int(c[1:])) if rows else []
    probabilities = np.array([[row[c] for c in columns] for row in rows], dtype=np.float64) if columns else None
    return Evaluation(rows, load_json(folder / SUMMARY_FILE), probabilities)


def evaluation_case_files(evaluation: Evaluation, images: str | Path | None = None) -> dict[str, CaseFiles]:
    """{case: CaseFiles} from the inputs summary.json records (the prediction and reference folders);
    ``images`` as evaluate's (default: the one it was given)."""
    inputs = evaluation.summary.get("inputs") or {}
    if not inputs.get("pred") or not inputs.get("gt"):
        raise ValueError("summary.json names no inputs (pred, gt); evaluate it again with this version")
    num_subtypes = int((evaluation.summary.get("classification") or {}).get("declared_subtypes") or 3)
    return find_case_files(inputs["pred"], inputs["gt"], [row["case_id"] for row in evaluation.rows],
                           images or inputs.get("images"), inputs.get("subtypes"), num_subtypes)


def metrics_by_subtype(rows: Sequence[dict], metrics: Sequence[str] = SEGMENTATION_METRICS) -> Table:
    """Mean and median of each metric per reference subtype and over all cases, with the misses (HD95 of a
    miss is the image diagonal, in the mean as in summary.json)."""
    groups = sorted({row["subtype"] for row in rows}, key=lambda s: (s is None, s))
    out = []
    for group in [*groups, "all"]:
        chosen = [row for row in rows if group == "all" or row["subtype"] == group]
        row = {"subtype": group if group != "all" else "all", "cases": len(chosen),
               "lesion misses": sum(1 for r in chosen if r.get("lesion_miss"))}
        for metric in metrics:
            values = np.array([r[metric] for r in chosen if r.get(metric) is not None], dtype=np.float64)
            values = values[np.isfinite(values)]
            row[f"{metric} mean"] = float(values.mean()) if values.size else None
            row[f"{metric} median"] = float(np.median(values)) if values.size else None
        out.append(row)
    return Table(out, title="segmentation metrics per reference subtype")


def classification_figures(evaluation: Evaluation, calibration_bins: int = 10) -> list:
    """The subtype confusion matrix, and with probabilities the ROC curves and the reliability diagram;
    none for an evaluation without subtypes."""
    scores = evaluation.summary.get("classification")
    if not scores:
        return []
    matrix = scores["confusion_matrix"]
    figures = [confusion_matrix_figure(matrix, f"macro F1 {scores['macro_f1']:.3f} over {len(matrix)} subtypes")]
    if evaluation.probabilities is not None:
        figures += [roc_figure(evaluation.rows, evaluation.probabilities, scores),
                    reliability_figure(evaluation.rows, evaluation.probabilities, calibration_bins)]
    return figures
