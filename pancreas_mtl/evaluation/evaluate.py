"""Scoring a prediction folder against reference masks and subtypes: a per-case table, a summary with
bootstrap confidence intervals, and plots.

    pancreas-mtl evaluate pred=DIR gt=DIR out=DIR [probs=FILE] [subtypes=FILE] [tolerance_mm=2]

(or ``python -m pancreas_mtl evaluate ...``; the keys and their defaults are in conf/evaluate.yaml, which
pancreas_mtl.commands.cli composes and types with EvaluationConfig.)

``gt`` is a dataset root in either layout (masks and subtypes from the layout; ``splits=[validation]``
picks splits), a split folder with ``subtype{k}/`` subfolders, or a folder of masks ``{case}.nii.gz``
with the subtypes in ``subtypes=`` or beside the masks (:mod:`pancreas_mtl.evaluation.references` reads
them). The predicted subtypes come from ``pred/subtype_results.csv`` and the probabilities from
``probs=`` or ``pred/subtype_probabilities.csv`` (``Names,p0,p1,...``). The summary and its bootstrap
intervals are :mod:`pancreas_mtl.evaluation.summary`'s.

Conventions: every metric is computed on the reference file's grid with its voxel spacing (mm), and
a prediction must have the reference's shape and affine. Dice is metrics.py's (both masks empty: 1).
Normalised surface Dice (NSD) at ``tolerance_mm``: metrics.py's (both empty: 1, one empty: 0). HD95 is
the larger of the two directed 95th percentiles of border-to-border distances (Metrics Reloaded,
MONAI): 0 when both masks are empty. A miss (only one mask empty) scores the worst case, HD95 = the
image diagonal in mm, in the per-case value and the means; ``*_miss`` in per_case.csv flags it and
the summary counts misses beside the mean. Classification scores are metrics.py's: macro F1 over the
``num_subtypes`` declared subtypes (one in neither reference nor prediction scores 0), one-vs-rest
AUROC. Confidence intervals: percentile bootstrap over cases (``bootstrap`` resamples, seeded by
``seed``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING, OmegaConf

from pancreas_mtl.raw.checks import AFFINE_ATOL_MM, clean_labels
from pancreas_mtl.raw.io import read_volume
from pancreas_mtl.evaluation.metrics import LESION_LABEL, segmentation_metrics
from pancreas_mtl.evaluation.plots import PLOT_FILES, write_plots
from pancreas_mtl.evaluation.references import (
    check_same_cases,
    find_case_files,
    label_maps,
    read_probabilities,
    read_subtypes,
    reference_cases,
)
from pancreas_mtl.evaluation.summary import SEGMENTATION_METRICS, STRUCTURES, conventions, summarise
from pancreas_mtl.files import save_json, write_csv
from pancreas_mtl.output_guard import OutputFolder
from pancreas_mtl.devices import map_with_progress

log = logging.getLogger(__name__)

COMMAND = "evaluate"
PER_CASE_FILE, SUMMARY_FILE = "per_case.csv", "summary.json"
# what is evaluated: another value of any of these in the same out is another evaluation (refused without
# overwrite); the other keys only shape its report, and a rerun with them changed replaces its own files
IDENTITY_KEYS = ("pred", "gt", "probs", "subtypes", "splits", "cases", "tolerance_mm", "num_subtypes")
PATH_KEYS = ("pred", "gt", "probs", "subtypes")


@dataclass
class EvaluationConfig:
    """The options of :func:`evaluate`, typing conf/evaluate.yaml's keys (in its order); the values live in
    that file only (the command line's, and :meth:`compose`'s for a mapping given in Python)."""

    pred: str = MISSING                 # folder of predicted masks {case}.nii.gz (+ subtype CSVs)
    gt: str = MISSING                   # reference: dataset root, split folder, or folder of masks
    out: str = MISSING                  # where per_case.csv, summary.json and the plots go
    probs: str | None = MISSING         # subtype probabilities CSV; null: pred/subtype_probabilities.csv
    subtypes: str | None = MISSING      # reference subtypes (JSON or CSV); null: from the gt layout
    splits: list[str] | None = MISSING  # gt dataset root: the splits to score; null: every labelled case
    cases: list[str] | None = MISSING   # only these reference cases (ids); null: every one gt and splits give
    tolerance_mm: float = MISSING       # NSD tolerance
    bootstrap: int = MISSING            # bootstrap resamples for the confidence intervals; 0: none
    seed: int = MISSING
    plots: bool = MISSING               # PNG plots (needs matplotlib)
    montage_cases: int = MISSING        # worst_cases.png: the cases with the lowest lesion Dice; 0: none
    images: str | None = MISSING        # folder of the images {case}_0000 for it; null: beside the masks / gt
    calibration_bins: int = MISSING     # bins of the reliability diagram of the subtype probabilities
    num_subtypes: int = MISSING         # the dataset's declared subtypes: macro scores average over all
    workers: int = MISSING              # processes scoring cases; 0: in this process
    progress: bool = MISSING
    overwrite: bool = MISSING           # an earlier evaluation of other inputs in out: remove its files first
    wandb: bool = MISSING               # the evaluate command only: also a W&B run (tracking/command_runs.py)
    wandb_project: str = MISSING

    @classmethod
    def compose(cls, config=None):
        """conf/evaluate.yaml with ``config`` (a mapping or DictConfig of some of its keys) over it, typed by
        this schema: what :func:`evaluate` reads. An unknown key or a value of the wrong type is an error."""
        from pancreas_mtl.config import config_dir

        values = OmegaConf.load(config_dir() / "evaluate.yaml")
        return OmegaConf.merge(OmegaConf.structured(cls), values, config or {})


# --- scoring one case -------------------------------------------------------------------------------

def score_case(case_id: str, pred_path: Path, true_path: Path, tolerance_mm: float) -> dict:
    """Segmentation metrics of one case on the reference's grid (see the module docstring)."""
    true = read_volume(true_path)
    pred = read_volume(pred_path)
    if pred.shape != true.shape:
        raise ValueError(f"case {case_id}: prediction {pred_path} has shape (z, y, x) {pred.shape}, "
                         f"the reference {true_path} {true.shape}")
    if not np.allclose(pred.affine, true.affine, rtol=1e-4, atol=AFFINE_ATOL_MM):
        raise ValueError(f"case {case_id}: prediction {pred_path} is on another grid than the reference "
                         f"{true_path}: affine\n{pred.affine}\nvs\n{true.affine}")
    allowed = {0, 1, LESION_LABEL}
    pred_labels = clean_labels(pred.array, allowed, pred_path)
    true_labels = clean_labels(true.array, allowed, true_path)
    return segmentation_metrics(pred_labels, true_labels, true.spacing, tolerance_mm)


# --- the command ------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Per-case rows (``per_case.csv``), the summary (``summary.json``), and the subtype probabilities
    (N, K) in the rows' order (None without them)."""

    rows: list[dict]
    summary: dict
    probabilities: np.ndarray | None = None


def evaluate(config: EvaluationConfig | dict) -> Evaluation:
    """Score ``config.pred`` against ``config.gt`` and write ``per_case.csv``, ``summary.json`` and the
    plots to ``config.out``; raises ValueError when the case sets differ (listing them)."""
    cfg = EvaluationConfig.compose(config)
    pred_dir, out = Path(cfg.pred).expanduser(), Path(cfg.out).expanduser()
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} not found")
    options = OmegaConf.to_container(cfg, resolve=True)
    identity = {key: str(Path(options[key]).expanduser().resolve()) if key in PATH_KEYS and options[key] else options[key]
                for key in IDENTITY_KEYS}
    folder = OutputFolder.open(out, COMMAND, identity=identity, overwrite=cfg.overwrite,
                               reads=[pred_dir, cfg.gt, cfg.probs, cfg.subtypes, cfg.images],
                               writes=[PER_CASE_FILE, SUMMARY_FILE, *PLOT_FILES], claim=False)
    reference = reference_cases(cfg.gt, cfg.subtypes, list(cfg.splits) if cfg.splits else None, cfg.num_subtypes)
    if cfg.cases is not None:
        absent = sorted(set(cfg.cases) - set(reference))
        if absent:
            raise ValueError(f"cases: {len(absent)} case(s) have no reference in {cfg.gt}: {', '.join(absent[:20])}")
        reference = {case: reference[case] for case in cfg.cases}
    predictions = label_maps(pred_dir)
    check_same_cases(f"the predictions in {pred_dir}", list(predictions), list(reference))
    results_path = pred_dir / "subtype_results.csv"
    probabilities_path = Path(cfg.probs) if cfg.probs else pred_dir / "subtype_probabilities.csv"
    if cfg.probs and not probabilities_path.is_file():
        raise FileNotFoundError(f"probabilities file {probabilities_path} not found")
    predicted = read_subtypes(results_path) if results_path.is_file() else None
    probabilities = read_probabilities(probabilities_path) if probabilities_path.is_file() else None
    for path, table in ((results_path, predicted), (probabilities_path, probabilities)):
        if table is not None:
            check_same_cases(str(path), list(table), list(reference))
    if probabilities is not None:
        widths = sorted({p.size for p in probabilities.values()})
        if widths != [cfg.num_subtypes]:
            raise ValueError(f"{probabilities_path}: {', '.join(map(str, widths))} subtype probability columns, "
                             f"but num_subtypes is {cfg.num_subtypes} (the declared subtypes the scores average over)")
    if predicted is None and probabilities is not None:
        predicted = {case: int(np.argmax(p)) for case, p in probabilities.items()}

    cases = sorted(reference)
    scores = map_with_progress(score_case, [(c, predictions[c], reference[c][0], cfg.tolerance_mm) for c in cases],
                               num_workers=cfg.workers, desc="evaluate", progress=cfg.progress)
    rows = []
    for case, score in zip(cases, scores):
        row = {"case_id": case, "subtype": reference[case][1],
               "predicted_subtype": None if predicted is None else predicted[case]}
        if probabilities is not None:
            row.update({f"p{k}": float(v) for k, v in enumerate(probabilities[case])})
        rows.append({**row, **{name: score[name] for name in SEGMENTATION_METRICS},
                     **{f"{structure}_miss": score[f"{structure}_miss"] for structure in STRUCTURES}})
    matrix = np.stack([probabilities[c] for c in cases]) if probabilities is not None else None
    summary = summarise(rows, matrix, cfg.bootstrap, cfg.seed, cfg.num_subtypes)
    summary["inputs"] = {"pred": str(pred_dir), "gt": str(cfg.gt), "probs": str(probabilities_path)
                         if probabilities is not None else None, "subtypes": cfg.subtypes,
                         "tolerance_mm": cfg.tolerance_mm, "images": cfg.images}
    summary["conventions"] = conventions(cfg.num_subtypes)
    folder.claim()
    folder.remove_unit(f".{COMMAND}")  # its own earlier files (a rerun may write fewer plots); kept if changed
    written = []
    if folder.may_write(PER_CASE_FILE):
        written.append(write_per_case(out / PER_CASE_FILE, rows).name)
    if folder.may_write(SUMMARY_FILE):
        written.append(save_json(_json_safe(summary), out / SUMMARY_FILE).name)
    if cfg.plots:
        files = (find_case_files(pred_dir, cfg.gt, cases, cfg.images, cfg.subtypes, cfg.num_subtypes)
                 if cfg.montage_cases > 0 else None)
        written += [path.name for path in write_plots(out, rows, matrix, summary, files, cfg.montage_cases,
                                                      cfg.calibration_bins, skip=folder.kept)]
    folder.record(f".{COMMAND}", written)
    return Evaluation(rows, summary, matrix)


def _json_safe(value):
    """NaN becomes null, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_per_case(path: Path, rows: list[dict]) -> Path:
    """per_case.csv: one row per case, the columns of the rows; floats with 4 decimals, None empty."""
    columns = list(rows[0])
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else value)
    return write_csv(path, columns, [[cell(row[c]) for c in columns] for row in rows])


def format_summary(summary: dict) -> str:
    """The headline numbers as a small text table."""
    lines = [f"{summary['num_cases']} case(s); misses (prediction or reference empty): "
             + ", ".join(f"{structure.replace('_', ' ')} {summary.get(f'{structure}_misses', 0)}"
                         for structure in STRUCTURES)]
    for name, values in summary["segmentation"].items():
        notes = []
        if values.get("misses"):
            notes.append(f"{values['misses']} miss{'es' if values['misses'] > 1 else ''} at the image diagonal")
        if values["undefined"]:
            notes.append(f"{values['undefined']} undefined")
        interval = f"[{values['ci_low']:.4f}, {values['ci_high']:.4f}]"
        lines.append(f"  {name:<22} {values['mean']:8.4f}  {interval}" + (f"  ({', '.join(notes)})" if notes else ""))
    scores = summary.get("classification")
    if scores:
        declared = scores.get("declared_subtypes")
        for name in ("macro_f1", "balanced_accuracy", "macro_auroc"):
            if name in scores:
                ci = scores["ci"].get(name, {"low": float("nan"), "high": float("nan")})
                note = f"  (macro over {declared} declared subtypes)" if name == "macro_f1" and declared else ""
                lines.append(f"  {name:<22} {scores[name]:8.4f}  [{ci['low']:.4f}, {ci['high']:.4f}]{note}")
        lines.append("  confusion matrix (rows reference, columns predicted): " + str(scores["confusion_matrix"]))
    return "\n".join(lines)
