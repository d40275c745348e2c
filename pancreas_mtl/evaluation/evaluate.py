"""Scoring a prediction folder against reference masks and subtypes: a per-case table, a summary with
bootstrap confidence intervals, and plots.

    pancreas-mtl evaluate pred=DIR gt=DIR out=DIR [probs=FILE] [subtypes=FILE] [tolerance_mm=2]

(or ``python -m pancreas_mtl evaluate ...``; the keys and their defaults are in conf/evaluate.yaml, which
pancreas_mtl.commands.cli composes and types with EvaluationConfig.)

``gt`` is a dataset root in either layout (masks and subtypes from the layout; ``splits=[validation]``
picks splits), a split folder with ``subtype{k}/`` subfolders, or a folder of masks ``{case}.nii.gz``
with the subtypes in ``subtypes=`` (JSON ``{case: k}`` or CSV ``Names,Subtype``) or beside the masks
(``subtypes.json``, ``subtype_mapping.json`` or ``subtype_reference.csv``, as the synthetic set's
``test_labels/`` has). The predicted subtypes come from ``pred/subtype_results.csv`` and the
probabilities from ``probs=`` or ``pred/subtype_probabilities.csv`` (``Names,p0,p1,...``).

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

import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING, OmegaConf

from pancreas_mtl.raw.checks import AFFINE_ATOL_MM, clean_labels
from pancreas_mtl.raw.io import image_suffix, read_volume, strip_suffix
from pancreas_mtl.raw.layout import CHANNEL_FILE, SUBTYPE_FOLDER, discover, is_dataset_root
from pancreas_mtl.evaluation.metrics import (
    LESION_LABEL,
    accuracy,
    balanced_accuracy,
    confusion_matrix,
    finite_mean,
    macro_f1,
    per_class_auroc,
    per_class_f1,
    per_class_recall,
    segmentation_metrics,
)
from pancreas_mtl.evaluation.plots import PLOT_FILES, write_plots
from pancreas_mtl.files import save_json
from pancreas_mtl.output_guard import OutputFolder
from pancreas_mtl.devices import map_with_progress

log = logging.getLogger(__name__)

SEGMENTATION_METRICS = ("whole_pancreas_dice", "lesion_dice", "whole_pancreas_nsd", "lesion_nsd",
                        "whole_pancreas_hd95", "lesion_hd95")
COMMAND = "evaluate"
PER_CASE_FILE, SUMMARY_FILE = "per_case.csv", "summary.json"
# what is evaluated: another value of any of these in the same out is another evaluation (refused without
# overwrite); the other keys only shape its report, and a rerun with them changed replaces its own files
IDENTITY_KEYS = ("pred", "gt", "probs", "subtypes", "splits", "cases", "tolerance_mm", "num_subtypes")
PATH_KEYS = ("pred", "gt", "probs", "subtypes")
STRUCTURES = ("whole_pancreas", "lesion")  # each has a ``{structure}_miss`` flag per case
SUBTYPE_FILES = ("subtypes.json", "subtype_mapping.json", "subtype_reference.csv")


@dataclass
class EvaluationConfig:
    """The options of :func:`evaluate`; on the command line the keys of conf/evaluate.yaml, whose defaults
    equal these (tests/test_evaluate.py checks it)."""

    pred: str = MISSING                 # folder of predicted masks {case}.nii.gz (+ subtype CSVs)
    gt: str = MISSING                   # reference: dataset root, split folder, or folder of masks
    out: str = MISSING                  # where per_case.csv, summary.json and the plots go
    probs: str | None = None            # subtype probabilities CSV; default pred/subtype_probabilities.csv
    subtypes: str | None = None         # reference subtypes (JSON or CSV); default from the gt layout
    splits: list[str] | None = None     # gt dataset root: the splits to score; null: every labelled case
    cases: list[str] | None = None      # only these reference cases (ids); null: every one gt and splits give
    tolerance_mm: float = 2.0           # NSD tolerance
    bootstrap: int = 1000               # bootstrap resamples for the confidence intervals; 0: none
    seed: int = 0
    plots: bool = True                  # PNG plots (needs matplotlib)
    montage_cases: int = 4              # worst_cases.png: the cases with the lowest lesion Dice; 0: none
    images: str | None = None           # folder of the images {case}_0000 for it; null: beside the masks or the gt layout
    calibration_bins: int = 10          # bins of the reliability diagram of the subtype probabilities
    num_subtypes: int = 3               # the dataset's declared subtypes: macro scores average over all
    workers: int = 0                    # processes scoring cases; 0: in this process
    progress: bool = True
    overwrite: bool = False             # an earlier evaluation of other inputs in out: remove its files first
    wandb: bool = False                 # the evaluate command (cli) only: also log a W&B run (tracking/command_runs.py)
    wandb_project: str = "pancreas_mtl"


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


# --- reading the folders ----------------------------------------------------------------------------

def _masks(folder: Path) -> dict[str, Path]:
    """{case: path} of the label maps in a folder: image files without a channel number."""
    return {strip_suffix(p): p for p in sorted(folder.iterdir())
            if p.is_file() and image_suffix(p) and not p.name.startswith(".")
            and not CHANNEL_FILE.match(strip_suffix(p))}


def read_subtypes(path: str | Path) -> dict[str, int]:
    """{case: subtype} from JSON ``{case: k}`` or a CSV with ``Names`` and ``Subtype`` columns."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{case: subtype}}")
        return {strip_suffix(k): int(v) for k, v in data.items()}
    rows = _read_csv(path, ["Names", "Subtype"])
    return {strip_suffix(row["Names"]): int(row["Subtype"]) for row in rows}


def read_probabilities(path: str | Path) -> dict[str, np.ndarray]:
    """{case: (K,) probabilities} from a ``Names,p0,p1,...`` CSV."""
    rows = _read_csv(path, ["Names", "p0"])
    columns = sorted((c for c in rows[0] if re.fullmatch(r"p\d+", c)), key=lambda c: int(c[1:])) if rows else []
    return {strip_suffix(row["Names"]): np.array([float(row[c]) for c in columns]) for row in rows}


def _read_csv(path: str | Path, required: Sequence[str]) -> list[dict]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: expected columns {list(required)}, found {reader.fieldnames}")
        return list(reader)


def reference_cases(gt: str | Path, subtypes: str | Path | None = None, splits: Sequence[str] | None = None,
                    num_subtypes: int = 3) -> dict[str, tuple[Path, int | None]]:
    """{case: (reference mask, subtype or None)} from a dataset root, a split folder or a folder of masks."""
    gt = Path(gt).expanduser()
    if not gt.is_dir():
        raise FileNotFoundError(f"reference folder {gt} not found")
    if is_dataset_root(gt):
        index = discover(gt, num_subtypes=num_subtypes)
        reference = {c.case_id: (c.label_path, c.subtype) for c in index.labelled
                     if splits is None or c.split in splits}
    else:
        reference = {case: (path, None) for case, path in _masks(gt).items()}
        for sub in sorted(p for p in gt.iterdir() if p.is_dir() and SUBTYPE_FOLDER.match(p.name)):
            subtype = int(SUBTYPE_FOLDER.match(sub.name)["subtype"])
            reference.update({case: (path, subtype) for case, path in _masks(sub).items()})
        if subtypes is None:
            subtypes = next((gt / name for name in SUBTYPE_FILES if (gt / name).is_file()), None)
    if subtypes is not None:
        mapping = read_subtypes(subtypes)
        missing = sorted(set(reference) - set(mapping))
        if missing:
            raise ValueError(f"{subtypes}: no subtype for {len(missing)} reference case(s): "
                             f"{', '.join(missing[:20])}")
        reference = {case: (path, mapping[case]) for case, (path, _) in reference.items()}
    if not reference:
        raise ValueError(f"no reference masks found in {gt}")
    return reference


def check_same_cases(what: str, found: Sequence[str], expected: Sequence[str]) -> None:
    """ValueError listing the cases missing from ``what`` and those it has beyond the reference."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        lines = [f"{what} and the reference hold different cases:"]
        if missing:
            lines.append(f"  missing from {what} ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  not in the reference ({len(extra)}): {', '.join(extra)}")
        raise ValueError("\n".join(lines))


# --- the evaluation ---------------------------------------------------------------------------------

def _interval(samples: np.ndarray) -> tuple[float, float]:
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


def classification_scores(targets: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray | None,
                          num_subtypes: int) -> dict[str, float]:
    """Macro F1 (over all ``num_subtypes`` declared subtypes), balanced accuracy and accuracy of the
    predicted subtypes, per-subtype F1 and recall, and with probabilities the one-vs-rest AUROC per
    subtype and their mean."""
    scores = {"macro_f1": macro_f1(targets, predicted, num_subtypes),
              "balanced_accuracy": balanced_accuracy(targets, predicted, num_subtypes),
              "accuracy": accuracy(targets, predicted)}
    f1, recall = per_class_f1(targets, predicted, num_subtypes), per_class_recall(targets, predicted, num_subtypes)
    for k in range(num_subtypes):
        scores[f"f1_{k}"], scores[f"recall_{k}"] = float(f1[k]), float(recall[k])
    if probabilities is not None:
        auroc = per_class_auroc(probabilities, targets)
        scores["macro_auroc"] = finite_mean(auroc)
        scores.update({f"auroc_{k}": float(auroc[k]) for k in range(num_subtypes)})
    return scores


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
    cfg = OmegaConf.merge(OmegaConf.structured(EvaluationConfig), config)
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
    predictions = _masks(pred_dir)
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
        from pancreas_mtl.evaluation.case_views import find_case_files  # it imports this module
        files = (find_case_files(pred_dir, cfg.gt, cases, cfg.images, cfg.subtypes, cfg.num_subtypes)
                 if cfg.montage_cases > 0 else None)
        written += [path.name for path in write_plots(out, rows, matrix, summary, files, cfg.montage_cases,
                                                      cfg.calibration_bins, skip=folder.kept)]
    folder.record(f".{COMMAND}", written)
    return Evaluation(rows, summary, matrix)


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
    from pancreas_mtl.files import write_csv

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
