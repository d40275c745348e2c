"""The W&B runs of predict.py (job type ``predict``) and ``pancreas-mtl evaluate`` (job type ``evaluate``),
linked to the training run that made the checkpoint.

A training checkpoint carries its W&B run's reference (``checkpoint["wandb"]``, see
:class:`pancreas_mtl.training.monitoring.WandbArtifacts`). A predict run records it in its config
(``train_run_id``, ``train_run_ids`` for an ensemble) and joins the training run's group (its id when
it had none), and writes its own reference to ``<output>/wandb/wandb_run.json``; an evaluate run of that
folder finds both there (or the checkpoints through the folder's case records), so the three runs of one
model share a group and name each other. Online, a run also declares the training run's config artifact
as its input (W&B's lineage graph); offline runs cannot (no server to resolve it), and keep the ids.

Called from the commands only (``pancreas_mtl.commands.predict``, ``pancreas_mtl.commands.tools``); the caller
catches and warns, a dashboard never fails a command whose files are written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_mtl.evaluation.evaluate import Evaluation
from pancreas_mtl.evaluation.roc import subtype_roc_curves
from pancreas_mtl.files import load_json, save_json
from pancreas_mtl.inference.runner import RunSummary, read_records
from pancreas_mtl.tracking.settings import (
    confusion_plot,
    roc_plot,
    run_reference,
    start_run,
    training_runs,
    wandb_table,
)

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"  # <folder>/wandb/wandb_run.json: the run that logged the folder, and its training runs


# --- the training runs ------------------------------------------------------------------------------

def link_config(training: Sequence[Mapping]) -> dict[str, Any]:
    """The run config entries naming the training run(s): ``train_run_id`` (the first), ``train_run_ids``."""
    return {"train_run_id": training[0]["id"] if training else None,
            "train_run_ids": [reference["id"] for reference in training],
            "train_project": training[0].get("project") if training else None}


def run_group(training: Sequence[Mapping]) -> str | None:
    """The group of a run made from these training runs: the first one's group, else its id."""
    return (training[0].get("group") or training[0]["id"]) if training else None


def _use_training_config(run: Any, training: Sequence[Mapping]) -> None:
    """Online: the training runs' config artifacts as this run's inputs (the lineage graph links the runs)."""
    if run.settings.mode != "online":
        return
    for reference in training:
        owner = "/".join(part for part in (reference.get("entity"), reference.get("project")) if part)
        name = f"{owner}/{reference['config_artifact']}:latest" if owner else f"{reference['config_artifact']}:latest"
        try:
            run.use_artifact(name)
        except Exception as error:  # noqa: BLE001 - the training run may not be uploaded (yet)
            log.warning("W&B: could not link the training run's config artifact %s (%s)", name, error)


def _write_run_file(folder: Path, run: Any, training: Sequence[Mapping]) -> None:
    save_json({**run_reference(run), "job_type": run.job_type, "training_runs": list(training)},
              folder / "wandb" / RUN_FILE)


# --- predict.py -------------------------------------------------------------------------------------

def prediction_rows(output_dir: str | Path) -> tuple[list[str], list[list]]:
    """(columns, rows) of the per-case table of a prediction folder, from its case records: case,
    predicted subtype and its probabilities, sliding windows, seconds and the mask's shape."""
    records = read_records(output_dir)
    num_subtypes = max((len(r.get("subtype_probabilities") or []) for r in records), default=0)
    columns = ["case", "predicted_subtype", *(f"p{k}" for k in range(num_subtypes)), "windows", "seconds",
               "shape_zyx", "inputs"]
    rows = []
    for record in records:
        probabilities = list(record.get("subtype_probabilities") or [None] * num_subtypes)
        rows.append([record["case_id"], record.get("subtype"), *probabilities, record.get("windows"),
                     (record.get("seconds") or {}).get("total"), "x".join(map(str, record.get("shape_zyx", []))),
                     ", ".join(record.get("inputs", []))])
    return columns, rows


def log_predict_run(output_dir: str | Path, summary: RunSummary, *, project: str, checkpoints: Sequence[str],
                    config: Mapping, offline: bool | str | None = "auto") -> Path:
    """The W&B run of one predict.py run, under ``output_dir``/wandb: the per-case table of every finished
    case of the folder, the failures, and the counts and mean seconds per case as its summary."""
    output_dir = Path(output_dir)
    training = training_runs(checkpoints)
    run = start_run(output_dir, project=project, group=run_group(training), name="predict", job_type="predict",
                    config={**config, "checkpoints": list(checkpoints), **link_config(training)}, offline=offline)
    try:
        _use_training_config(run, training)
        payload: dict[str, Any] = {"predict/cases": wandb_table(*prediction_rows(output_dir))}
        if summary.failed:
            payload["predict/failed"] = wandb_table(["case", "reason"], sorted(summary.failed.items()))
        run.log(payload)
        totals = [timing["total"] for timing in summary.timings]
        run.summary.update({"predict/predicted": len(summary.predicted), "predict/skipped": len(summary.skipped),
                            "predict/failed": len(summary.failed)})
        if totals:
            run.summary.update({"predict/seconds_per_case": float(np.mean(totals)),
                                "predict/network_seconds_per_case": float(np.mean([t["network"]
                                                                                   for t in summary.timings]))})
        _write_run_file(output_dir, run, training)
    finally:
        run.finish()
    return output_dir / "wandb"


# --- pancreas-mtl evaluate --------------------------------------------------------------------------

def evaluation_scores(summary: Mapping) -> dict[str, float]:
    """summary.json's headline numbers as flat ``evaluate/*`` scalars: each segmentation metric's mean,
    median and interval, the misses, and the classification scores."""
    scores: dict[str, float] = {"evaluate/num_cases": summary["num_cases"]}
    scores.update({f"evaluate/{key}": value for key, value in summary.items() if key.endswith("_misses")})
    for name, values in summary.get("segmentation", {}).items():
        scores.update({f"evaluate/{name}" if stat == "mean" else f"evaluate/{name}_{stat}": values[stat]
                       for stat in ("mean", "median", "ci_low", "ci_high") if stat in values})
    classification = summary.get("classification") or {}
    scores.update({f"evaluate/{key}": value for key, value in classification.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)})
    for key, interval in (classification.get("ci") or {}).items():
        scores.update({f"evaluate/{key}_ci_low": interval["low"], f"evaluate/{key}_ci_high": interval["high"]})
    return {key: float(value) for key, value in scores.items()
            if isinstance(value, (int, float)) and np.isfinite(value)}


def _evaluation_training_runs(pred_dir: Path) -> tuple[dict | None, list[dict]]:
    """The predict run that wrote ``pred_dir`` (its wandb_run.json) and the training runs of its checkpoints."""
    run_file = pred_dir / "wandb" / RUN_FILE
    predicted_by = load_json(run_file) if run_file.is_file() else None
    if predicted_by is not None and predicted_by.get("training_runs"):
        return predicted_by, list(predicted_by["training_runs"])
    checkpoints = next((record["checkpoints"] for record in read_records(pred_dir) if record.get("checkpoints")), [])
    return predicted_by, training_runs(checkpoints)


def roc_curves(rows: Sequence[Mapping], probabilities: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"subtype{k}": (fpr, tpr)}``: :func:`~pancreas_mtl.evaluation.roc.subtype_roc_curves` of the cases
    with a reference subtype."""
    if probabilities is None:
        return {}
    curves = subtype_roc_curves(probabilities, [row.get("subtype") for row in rows])
    return {f"subtype{k}": curve for k, curve in curves.items()}


def log_evaluation_run(out: str | Path, evaluation: Evaluation, *, pred: str | Path, project: str, config: Mapping,
                       offline: bool | str | None = "auto") -> Path:
    """The W&B run of one evaluation, under ``out``/wandb: ``evaluate/*`` scalars in its summary, the per-case
    and per-subtype tables, the confusion matrix and ROC curves as W&B charts, and the PNG plots written
    to ``out`` as images."""
    import wandb

    out, pred_dir = Path(out), Path(pred)
    predicted_by, training = _evaluation_training_runs(pred_dir)
    links = {**link_config(training), "predict_run_id": (predicted_by or {}).get("id")}
    run = start_run(out, project=project, group=run_group(training), name="evaluate", job_type="evaluate",
                    config={**config, **links}, offline=offline)
    try:
        _use_training_config(run, training)
        rows = evaluation.rows
        columns = list(rows[0]) if rows else []
        payload: dict[str, Any] = {
            "evaluate/cases": wandb_table(columns, [[row[column] for column in columns] for row in rows])}
        per_subtype = evaluation.summary.get("per_subtype") or {}
        if per_subtype:
            names = sorted({key for values in per_subtype.values() for key in values})
            payload["evaluate/per_subtype"] = wandb_table(
                ["subtype", *names],
                [[int(subtype), *(values.get(name) for name in names)] for subtype, values in per_subtype.items()])
        classification = evaluation.summary.get("classification")
        if classification:
            matrix = classification["confusion_matrix"]
            names = [f"subtype{k}" for k in range(len(matrix))]
            payload["evaluate/confusion_matrix"] = confusion_plot(matrix, names)
        curves = roc_curves(rows, evaluation.probabilities)
        if curves:
            payload["evaluate/roc"] = roc_plot(curves)
        for path in sorted(out.glob("*.png")):
            payload[f"evaluate/plots/{path.stem}"] = wandb.Image(str(path), caption=path.name)
        run.log(payload)
        run.summary.update(evaluation_scores(evaluation.summary))
        _write_run_file(out, run, training)
    finally:
        run.finish()
    return out / "wandb"
