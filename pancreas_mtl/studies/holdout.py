"""Scoring the runs of a fixed-split sweep (seeds, heads, loss weights) on their held-out splits: each
job's chosen checkpoint predicts the validation split and the labelled test split, each prediction is
scored by the same evaluation as every other, and the training log adds how much the run swung.

    python train.py -m experiment=X model/head=multistage,ovr seed=0,1,2
    pancreas-mtl holdout multirun=outputs/runs/train/multirun/<date>_<time>
    pancreas-mtl compare runs=[<that multirun>] out=outputs/compare     # mean and sd over seeds, ranked

Where cross-validation (crossval.py) scores the folds of one experiment together, here every job is
scored on its own, and compare groups the jobs that differ only in their seed. The validation cases
are the job's own (``data.splits.make_split`` with its data settings, as training split them); the test
cases are the dataset's ``test`` images against ``test_labels`` (the synthetic set writes it; a real
dataset without test labels is scored on validation only). Writes, under ``<multirun>/holdout/`` (or
``out``; another folder per checkpoint rule, e.g. ``checkpoint=selected out=<multirun>/holdout_selected``):

    <job>/<split>/predictions/   predict.py's folder for the job's checkpoint on that split
    <job>/<split>/evaluation/    per_case.csv, summary.json, plots
    holdout.json                 per job: overrides, checkpoint, how it was chosen, the training log's final
                                 and best validation F1, the weights of its combined score (its run config's
                                 module.combined_metric) and the scores of every split (compare reads it)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING, OmegaConf

from pancreas_mtl.raw.splits import make_split
from pancreas_mtl.studies.crossval import (
    headline_scores,
    index_of,
    job_dirs,
    run_combined_weights,
    run_data_config,
)
from pancreas_mtl.evaluation.evaluate import EvaluationConfig, evaluate
from pancreas_mtl.evaluation.runs import epoch_curves, read_run_metrics, run_overrides
from pancreas_mtl.files import load_json, save_json
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import predict_cases
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.output_guard import OutputFolder, refuse_reads

log = logging.getLogger(__name__)

HOLDOUT_DIR = "holdout"
COMMAND = "holdout"
SUMMARY_FILE = "holdout.json"
SPLITS = ("validation", "test")
SELECTED = "selected"  # checkpoint=selected: the one model selection kept (conf/callbacks: model_checkpoint)


@dataclass
class HoldoutConfig:
    """The keys of conf/holdout.yaml (``pancreas-mtl holdout --help``)."""

    multirun: str = MISSING
    out: str | None = MISSING
    splits: list[str] = MISSING
    test_labels: str | None = MISSING
    checkpoint: str = MISSING
    unfinished: str = MISSING
    inference: str = MISSING
    engine: str | None = MISSING
    device: str = MISSING
    precision: str = MISSING
    overwrite: bool = MISSING
    tolerance_mm: float = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    plots: bool = MISSING
    workers: int = MISSING
    progress: bool = MISSING


# --- one job ------------------------------------------------------------------------------------------

def chosen_checkpoint(job: Path, name: str = SELECTED) -> Path:
    """The checkpoint a job is scored with: ``checkpoint=selected`` is the one model selection kept
    (``checkpoints/*select*.ckpt``, written by the model_checkpoint callback), any other value a file
    name in ``checkpoints/``.

    Raises:
        FileNotFoundError: there is no such checkpoint (names the job and what is there).
        ValueError: model selection left several checkpoints, so which one it chose is ambiguous.
    """
    folder = job / "checkpoints"
    if name != SELECTED:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"job {job}: no checkpoint {path.relative_to(job)}")
        return path
    selected = sorted(folder.glob("*select*.ckpt"))
    if len(selected) > 1:
        raise ValueError(f"job {job}: model selection left {len(selected)} checkpoints ({', '.join(p.name for p in selected)})"
                         "; name one with checkpoint=<file in checkpoints/>")
    if not selected:
        found = sorted(p.name for p in folder.glob("*.ckpt"))
        raise FileNotFoundError(f"job {job}: no checkpoint chosen by model selection (checkpoints/*select*.ckpt; found "
                                f"{found or 'none'}); checkpoint=last.ckpt scores the last one")
    return selected[0]


def selection_source(data: Mapping) -> str:
    """Which cases model selection chose the job's checkpoint on: its inner validation split, else the
    validation split (``named`` in holdout.json for a checkpoint given by name). ``data``: the job's data
    config as the checkpoint keeps it, where a null ``inner_validation.cases`` has been made a number."""
    inner = (data.get("inner_validation") or {}).get("cases") or 0
    return f"inner validation ({inner} of the training cases)" if inner else "validation"


def training_summary(job: Path) -> dict:
    """From the job's training log: its epochs and the validation macro F1 at the last validation and at
    its best (their gap says how much the model swung); None where the log has no F1."""
    curves = epoch_curves(read_run_metrics(job))
    epochs = max((int(e.max()) + 1 for e, _ in curves.values() if e.size), default=0)
    if "val/macro_f1" not in curves or not np.isfinite(curves["val/macro_f1"][1]).any():
        return {"epochs": epochs, "final_f1": None, "best_f1": None}
    values = curves["val/macro_f1"][1]
    return {"epochs": epochs, "final_f1": float(values[-1]), "best_f1": float(np.nanmax(values))}


def is_finished(job: Path, job_config: Mapping) -> bool:
    """Whether the job trained every epoch its config asks for (its log reaches ``trainer.max_epochs``)."""
    max_epochs = OmegaConf.select(OmegaConf.create(dict(job_config)), "trainer.max_epochs", default=None)
    try:
        epochs = training_summary(job)["epochs"]
    except FileNotFoundError:
        return False
    return max_epochs is None or epochs >= int(max_epochs)


# --- the command ------------------------------------------------------------------------------------

def _test_labels(cfg, root: Path) -> Path | None:
    if cfg.test_labels is not None:
        path = Path(cfg.test_labels).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"test_labels={cfg.test_labels}: folder not found")
        return path
    default = root / "test_labels"
    return default if default.is_dir() else None


def run_holdout(cfg) -> dict:
    """Predict and evaluate every finished job on ``cfg.splits``; returns the contents of holdout.json."""
    cfg = OmegaConf.merge(OmegaConf.structured(HoldoutConfig), cfg)
    unknown = sorted(set(cfg.splits) - set(SPLITS))
    if unknown or not cfg.splits:
        raise ValueError(f"splits must be a non-empty list of {', '.join(SPLITS)}, got {list(cfg.splits)}")
    if cfg.unfinished not in ("skip", "error"):
        raise ValueError(f"unfinished must be skip or error, got {cfg.unfinished!r}")
    multirun = Path(cfg.multirun).expanduser().resolve()
    out = Path(cfg.out).expanduser().resolve() if cfg.out else multirun / HOLDOUT_DIR
    settings = InferenceSettings.preset(cfg.inference)
    if cfg.engine is not None:
        settings = dataclasses.replace(settings, engine=cfg.engine)
    # what decides the predictions and what they are scored against (the evaluations check their own settings)
    identity = {"multirun": str(multirun), "checkpoint": cfg.checkpoint, "inference": settings.name,
                "engine": settings.engine, "precision": cfg.precision,
                "test_labels": cfg.test_labels and str(Path(cfg.test_labels).expanduser().resolve())}
    folder = OutputFolder.open(out, COMMAND, identity=identity, reads=job_dirs(multirun), writes=[SUMMARY_FILE],
                               overwrite=cfg.overwrite, claim=False)  # claimed by the first job's predictions
    jobs, skipped, datasets = [], [], set()
    for job in job_dirs(multirun):
        job_config = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"))
        if not is_finished(job, job_config):
            if cfg.unfinished == "error":
                raise ValueError(f"job {job} has not trained all its epochs (its log ends early); unfinished=skip "
                                 "scores the finished jobs only")
            log.warning("job %s has not finished training; skipped", job)
            skipped.append(job.name)
            continue
        checkpoint = chosen_checkpoint(job, cfg.checkpoint)
        data = run_data_config(job, checkpoint)
        weights = run_combined_weights(job, checkpoint)
        index = index_of(data)
        datasets.add(str(index.root))
        refuse_reads(out, [index.root])
        split = make_split(index, mode=data.get("split", "auto"), fold=int(data.get("fold", 0)),
                           num_folds=int(data.get("num_folds", 5)), seed=int(data.get("split_seed", 12345)))
        test_labels = _test_labels(cfg, index.root)
        case_sets = {"validation": (set(split.val), str(index.root)),
                     "test": ({case.case_id for case in index.split("test")}, test_labels and str(test_labels))}
        predictor = Predictor.from_checkpoints([checkpoint], settings, device=cfg.device, precision=cfg.precision)
        images = find_cases(index.root)  # the dataset's images, and the problems of those that cannot be read
        scores = {}
        for name in cfg.splits:
            wanted, reference = case_sets[name]
            if reference is None or not wanted:
                log.warning("job %s: no labelled %s cases (test labels: %s); %s not scored", job.name, name,
                            test_labels or f"no {index.root / 'test_labels'}", name)
                continue
            folder.claim()
            scores[name] = _score_split(cfg, predictor, images, wanted, reference, out / job.name / name,
                                        num_subtypes=int(data.get("num_subtypes", 3)), weights=weights,
                                        run_info={"checkpoints": [str(checkpoint)], "inference": settings.name})
        jobs.append({"job": job.name, "folder": str(job), "overrides": run_overrides(job),
                     "checkpoint": str(checkpoint),
                     "selected_on": selection_source(data) if cfg.checkpoint == SELECTED else "named",
                     "training": training_summary(job), "combined_metric": weights, "scores": scores})
    if not jobs:
        raise ValueError(f"{multirun}: no finished job to score (unfinished: {', '.join(skipped)})")
    if len(datasets) > 1:
        raise ValueError(f"{multirun}: the jobs trained on different datasets ({', '.join(sorted(datasets))})")
    result = {"multirun": str(multirun), "out": str(out), "dataset": datasets.pop(), "checkpoint": cfg.checkpoint,
              "inference": settings.name,
              "engine": settings.engine, "precision": cfg.precision, "splits": list(cfg.splits), "jobs": jobs,
              "unfinished": skipped}
    if folder.may_write(SUMMARY_FILE):
        save_json(result, out / SUMMARY_FILE)
    folder.record(f".{COMMAND}", [SUMMARY_FILE])
    return result


def _score_split(cfg, predictor: Predictor, images: tuple[list, dict], wanted: set[str], reference: str, folder: Path, *,
                 num_subtypes: int, weights: Mapping[str, float], run_info: dict) -> dict:
    """One job's predictions of one split and their evaluation; the headline scores (``combined`` with the
    job's own ``weights``)."""
    cases, problems = images
    chosen = [case for case in cases if case.case_id in wanted]
    summary = predict_cases(predictor, chosen, folder / "predictions", overwrite=cfg.overwrite,
                            problems={c: reason for c, reason in problems.items() if c in wanted},
                            progress=cfg.progress, run_info=run_info)
    if summary.failed:
        raise ValueError(f"{len(summary.failed)} case(s) of {folder} could not be predicted:\n  "
                         + "\n  ".join(f"{case}: {reason}" for case, reason in sorted(summary.failed.items())))
    evaluation = evaluate(EvaluationConfig.compose(dict(
        pred=str(folder / "predictions"), gt=reference, out=str(folder / "evaluation"),
        cases=sorted(case.case_id for case in chosen), tolerance_mm=cfg.tolerance_mm,
        bootstrap=cfg.bootstrap, seed=cfg.seed, plots=cfg.plots, num_subtypes=num_subtypes, workers=cfg.workers,
        progress=cfg.progress, overwrite=cfg.overwrite)))
    scores = headline_scores(evaluation.summary, weights)
    ci = evaluation.summary.get("classification", {}).get("ci", {}).get("macro_f1")
    return {**scores, "num_cases": len(evaluation.rows), "macro_f1_ci": ci}


def holdout_dir(folder: str | Path) -> Path:
    """The holdout folder of a sweep folder, or the folder itself when it is one."""
    folder = Path(folder).expanduser()
    return folder if (folder / SUMMARY_FILE).is_file() or folder.name == HOLDOUT_DIR else folder / HOLDOUT_DIR


def read_holdout(folder: str | Path) -> dict:
    """holdout.json of a holdout folder or of a sweep folder scored before."""
    path = holdout_dir(folder) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {HOLDOUT_DIR}/{SUMMARY_FILE}; run pancreas-mtl holdout multirun={folder} first")
    summary = load_json(path)
    missing = [key for key in ("dataset", "checkpoint", "splits", "jobs") if key not in summary]
    if missing:
        raise ValueError(f"{path}: not a holdout summary of this version (no {', '.join(missing)}); run "
                         f"pancreas-mtl holdout multirun={summary.get('multirun', '<the sweep>')} again")
    return summary
