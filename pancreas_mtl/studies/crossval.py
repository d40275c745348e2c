"""Cross-validation of a k-fold sweep: each fold's held-out cases predicted with its own checkpoint, all
of them scored together, and the fold ensemble written for predict.py.

    python train.py -m experiment=X data.split=kfold data.fold=0,1,2,3,4
    pancreas-mtl crossval multirun=outputs/runs/train/multirun/<date>_<time>

The sweep folder holds one job folder per fold (``<n>/.hydra/config.yaml``, ``<n>/checkpoints/last.ckpt``).
Each job's fold and split settings come from its run config; its held-out cases are recomputed with
the split function training used (``data.splits.make_split`` over the discovered dataset), never
guessed. Writes, under ``<multirun>/crossval/``:

    predictions/fold_{k}/   fold k's held-out cases, predicted by fold k's checkpoint (predict.py's folder)
    out_of_fold/            every case once: links to the fold masks, merged subtype tables
    evaluation/             the evaluation of out_of_fold/ (per_case.csv, summary.json, plots)
    ensemble.yaml           the fold checkpoints: ``predict.py ckpt=<multirun>/crossval/ensemble.yaml``
    crossval.json           folds, cases, checkpoints, preset, and the scores compare ranks by

``combined`` is the folds' own combined score (``module.combined_metric`` of their run config, the
weights training's ``val/combined`` used): the folds must agree on it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pancreas_mtl.raw.layout import DatasetIndex, discover
from pancreas_mtl.raw.splits import make_split
from pancreas_mtl.dataset.prepare import dataset_root
from pancreas_mtl.evaluation.combined import combined_score, run_weights
from pancreas_mtl.evaluation.evaluate import EvaluationConfig, evaluate
from pancreas_mtl.files import atomic_path, load_json, save_json, sha256, write_csv
from pancreas_mtl.inference.checkpoint import ENSEMBLE_FILE, ENSEMBLE_FORMAT, plan_sha256, read_checkpoint
from pancreas_mtl.inference.output_folder import SUBTYPE_PROBABILITIES, SUBTYPE_RESULTS
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import predict_cases, read_records
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.output_guard import OutputFolder
from pancreas_mtl.tracking.settings import log_summary_run

log = logging.getLogger(__name__)

CROSSVAL_DIR = "crossval"
COMMAND = "crossval"
OUT_OF_FOLD_UNIT = ".out_of_fold"
SUMMARY_FILE = "crossval.json"
# the data settings every fold must share: they decide which cases exist and how they are split
SHARED_DATA_KEYS = ("source", "root", "num_subtypes", "split", "num_folds", "split_seed")


@dataclass
class CrossvalConfig:
    """The keys of conf/crossval.yaml (``pancreas-mtl crossval --help``)."""

    multirun: str = MISSING
    out: str | None = MISSING
    checkpoint: str = MISSING
    inference: str = MISSING
    save_probabilities: bool = MISSING
    device: str = MISSING
    precision: str = MISSING
    overwrite: bool = MISSING
    tolerance_mm: float = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    plots: bool = MISSING
    workers: int = MISSING
    progress: bool = MISSING
    wandb: bool = MISSING
    wandb_project: str = MISSING


@dataclass
class FoldRun:
    """One job of the sweep: its folder, fold, checkpoint, data settings, held-out cases and the weights of
    its combined score."""

    job_dir: Path
    fold: int
    checkpoint: Path
    data: dict
    held_out: list[str]
    combined_metric: dict[str, float]


# --- reading the sweep ------------------------------------------------------------------------------

def job_dirs(multirun: Path) -> list[Path]:
    """The job folders of a Hydra sweep folder (``<n>/.hydra/config.yaml``), by job number."""
    if not multirun.is_dir():
        raise FileNotFoundError(f"multirun folder {multirun} not found")
    jobs = [p for p in multirun.iterdir() if p.is_dir() and (p / ".hydra" / "config.yaml").is_file()]
    if not jobs:
        hint = (" (it is a single run's folder; cross-validation needs the sweep folder "
                "outputs/runs/<task>/multirun/<date>_<time>/ of train.py -m ... data.fold=0,1,...)"
                if (multirun / ".hydra" / "config.yaml").is_file() else "")
        raise ValueError(f"{multirun} is not a multirun folder: no job folder <n>/.hydra/config.yaml in it{hint}")
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def run_data_config(job_dir: Path, checkpoint: Path) -> dict:
    """The job's resolved ``data`` config: the checkpoint's (resolved when training ran, so paths do not
    depend on where this command runs), else the job's .hydra/config.yaml resolved now. The fold must
    agree between the two (a checkpoint copied from another job is refused)."""
    saved = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    if "data" not in saved:
        raise ValueError(f"{job_dir / '.hydra' / 'config.yaml'}: no data node; not a train.py run")
    fold = OmegaConf.select(saved, "data.fold")
    _, _, config = read_checkpoint(checkpoint)
    data = (config or {}).get("data")
    if data is None:
        with_paths = OmegaConf.masked_copy(saved, ["data", "paths"])
        OmegaConf.update(with_paths, "paths.output_dir", str(job_dir), force_add=True)
        try:
            data = OmegaConf.to_container(with_paths, resolve=True)["data"]
        except OmegaConfBaseException as error:
            raise ValueError(f"{job_dir / '.hydra' / 'config.yaml'}: cannot resolve its data config "
                             f"({str(error).splitlines()[0]}), and {checkpoint} stores none") from None
    elif data.get("fold") != fold:
        raise ValueError(f"{checkpoint}: the checkpoint was trained on fold {data.get('fold')}, but its job's "
                         f"config {job_dir / '.hydra' / 'config.yaml'} says data.fold={fold}")
    return data


def run_combined_weights(job_dir: Path, checkpoint: Path) -> dict[str, float]:
    """The weights of the job's combined score: ``module.combined_metric`` of the config its checkpoint
    stores (what training ranked by), else of its .hydra/config.yaml, else conf/module/default.yaml's."""
    _, _, stored = read_checkpoint(checkpoint)
    config_file = job_dir / ".hydra" / "config.yaml"
    saved = OmegaConf.to_container(OmegaConf.load(config_file))
    return run_weights([(f"{checkpoint} (its stored config)", stored), (str(config_file), saved)])


def shared_weights(folder: Path, weights: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The one set of combined-score weights of a sweep's jobs (``{job: weights}``); ValueError naming the
    jobs when they disagree, since their folds would be ranked on different scores."""
    distinct: dict[str, list[str]] = {}
    for job, job_weights in weights.items():
        distinct.setdefault(repr(dict(sorted(job_weights.items()))), []).append(job)
    if len(distinct) > 1:
        raise ValueError(f"{folder}: the jobs disagree on module.combined_metric, the combined score they are "
                         "ranked by:\n  " + "\n  ".join(f"job{'s' * (len(jobs) > 1)} {', '.join(jobs)}: {found}"
                                                      for found, jobs in distinct.items()))
    return dict(next(iter(weights.values())))


def index_of(data: Mapping) -> DatasetIndex:
    return discover(dataset_root(data, progress=False), num_subtypes=int(data.get("num_subtypes", 3)))


def read_sweep(multirun: str | Path, checkpoint_name: str = "last.ckpt") -> tuple[list[FoldRun], DatasetIndex]:
    """The fold runs of a k-fold sweep, sorted by fold, and the dataset they split.

    Raises:
        ValueError: ``multirun`` is not a sweep folder, a job lacks its checkpoint, the jobs disagree on the
            dataset or split settings, a fold repeats or is missing, or the held-out sets do not partition
            the labelled cases; each names the folder and what was found.
    """
    multirun = Path(multirun).expanduser().resolve()
    runs, datas = [], []
    for job in job_dirs(multirun):
        checkpoint = job / "checkpoints" / checkpoint_name
        if not checkpoint.is_file():
            raise ValueError(f"job {job} has no checkpoint {checkpoint.relative_to(job)} (did it finish? "
                             "checkpoint=<name> picks another file in checkpoints/)")
        datas.append((job, checkpoint, run_data_config(job, checkpoint)))
    first_job, _, first = datas[0]
    for job, _, data in datas[1:]:
        differing = [f"data.{key}: {first.get(key)!r} in {first_job.name}, {data.get(key)!r} in {job.name}"
                     for key in SHARED_DATA_KEYS if data.get(key) != first.get(key)]
        if differing:
            raise ValueError(f"{multirun}: the jobs disagree on the dataset or its split, so their folds do not "
                             "belong to one cross-validation:\n  " + "\n  ".join(differing))
    index = index_of(first)
    for job, checkpoint, data in datas:
        split = make_split(index, mode=data.get("split", "auto"), fold=int(data["fold"]),
                           num_folds=int(data.get("num_folds", 5)), seed=int(data.get("split_seed", 12345)))
        if split.source == "validation folder":
            raise ValueError(f"job {job}: its split is the dataset's validation folder (data.split="
                             f"{data.get('split')!r}), one held-out set rather than folds; cross-validation "
                             "needs data.split=kfold (or an nnU-Net splits_final.json)")
        runs.append(FoldRun(job, int(data["fold"]), checkpoint, data, list(split.val),
                            run_combined_weights(job, checkpoint)))
    _check_folds(multirun, runs, index)
    shared_weights(multirun, {run.job_dir.name: run.combined_metric for run in runs})
    return sorted(runs, key=lambda run: run.fold), index


def _check_folds(multirun: Path, runs: Sequence[FoldRun], index: DatasetIndex) -> None:
    counts = Counter(run.fold for run in runs)
    repeated = {fold: [run.job_dir.name for run in runs if run.fold == fold] for fold, n in counts.items() if n > 1}
    if repeated:
        raise ValueError(f"{multirun}: fold(s) trained more than once: " + "; ".join(
            f"fold {fold} in jobs {', '.join(jobs)}" for fold, jobs in sorted(repeated.items())))
    num_folds = len(index.splits) if index.splits and runs[0].data.get("split") != "kfold" \
        else int(runs[0].data.get("num_folds", 5))
    missing = sorted(set(range(num_folds)) - set(counts))
    if missing:
        raise ValueError(f"{multirun}: fold(s) {missing} of {num_folds} missing (found {sorted(counts)}); "
                         f"train them into the sweep, e.g. train.py -m ... data.fold={','.join(map(str, missing))}")
    seen = Counter(case for run in runs for case in run.held_out)
    twice = sorted(case for case, n in seen.items() if n > 1)
    unseen = sorted({case.case_id for case in index.labelled} - set(seen))
    if twice or unseen:
        raise ValueError(f"{multirun}: the held-out sets do not partition the labelled cases (held out twice: "
                         f"{twice[:10]}, never: {unseen[:10]})")


# --- the command ------------------------------------------------------------------------------------

def crossval_dir(folder: str | Path) -> Path:
    """The crossval folder of a sweep folder, or the folder itself when it is one."""
    folder = Path(folder).expanduser()
    return folder if (folder / SUMMARY_FILE).is_file() or folder.name == CROSSVAL_DIR else folder / CROSSVAL_DIR


def merge_out_of_fold(fold_dirs: Sequence[Path], out: Path, overwrite: bool = False) -> Path:
    """``out``: a relative link to every fold's mask (and probabilities) plus the subtype tables of all
    folds, so that one evaluation scores every case. ``out`` is this command's own folder (the output-folder
    guard's record lists its links and tables); the ones it held before are replaced."""
    links, results, probabilities = {}, [], []
    for fold_dir in fold_dirs:
        for record in read_records(fold_dir):
            for name in record.get("files", [record["mask"]]):
                if (fold_dir / name).is_file():
                    links[name] = fold_dir / name
            if record.get("subtype_probabilities"):
                results.append((record["mask"], record["subtype"]))
                probabilities.append((record["mask"], *(f"{p:.6f}" for p in record["subtype_probabilities"])))
    folder = OutputFolder.open(out, COMMAND, identity={"folds": [str(Path(d).resolve()) for d in fold_dirs]},
                               reads=fold_dirs, writes=[*links, SUBTYPE_RESULTS, SUBTYPE_PROBABILITIES],
                               overwrite=overwrite)
    folder.remove_unit(OUT_OF_FOLD_UNIT)
    for name, target in links.items():
        if folder.may_write(name):
            os.symlink(os.path.relpath(target, out), out / name)
    tables = []
    if results:
        tables.append(write_csv(out / SUBTYPE_RESULTS, ["Names", "Subtype"], sorted(results)).name)
    if probabilities:
        width = len(probabilities[0]) - 1
        tables.append(write_csv(out / SUBTYPE_PROBABILITIES, ["Names", *(f"p{k}" for k in range(width))],
                                sorted(probabilities)).name)
    folder.record(OUT_OF_FOLD_UNIT, [*links, *tables])
    return out


def write_ensemble(path: Path, runs: Sequence[FoldRun]) -> Path:
    """ensemble.yaml, read by predict.py's ``ckpt=``: the fold checkpoints by path relative to the file's
    folder (so a copied or moved sweep predicts from its own files), each with its SHA-256 and fold, and
    the SHA-256 of the plan they share; ``checkpoint.ensemble_members`` checks all three when reading.
    ValueError when the folds' plans differ (they would not form one ensemble)."""
    folder = path.parent.resolve()
    plans = [read_checkpoint(run.checkpoint)[1] for run in runs]
    first = plans[0].to_dict()
    for run, plan in zip(runs[1:], plans[1:]):
        differing = sorted(key for key, value in plan.to_dict().items() if first.get(key) != value)
        if differing:
            raise ValueError(f"{path}: fold {run.fold}'s checkpoint {run.checkpoint} has another plan than fold "
                             f"{runs[0].fold}'s ({', '.join(differing)} differ), so the folds do not form one "
                             "ensemble; train every fold with the same planning settings")
    members = [{"checkpoint": Path(os.path.relpath(Path(run.checkpoint).resolve(), folder)).as_posix(),
                "sha256": sha256(run.checkpoint), "fold": run.fold} for run in runs]
    text = ("# The fold ensemble of a cross-validated sweep: predict.py ckpt=<this file> averages the folds.\n"
            "# Members are paths from this file's folder; a member whose SHA-256 differs is refused.\n"
            + yaml.safe_dump({"format": ENSEMBLE_FORMAT, "plan_sha256": plan_sha256(plans[0]), "members": members},
                             sort_keys=False))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _finite(value) -> float | None:
    """A score as JSON keeps it: None where it is undefined (missing or NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


def headline_scores(summary: Mapping, weights: Mapping[str, float] | None) -> dict[str, float | None]:
    """The scores compare ranks by, from an evaluation summary; ``combined`` is the runs' own combined score
    with ``weights`` (their ``module.combined_metric``; undefined scores left out, as training leaves them
    out of ``val/combined``), None without weights (runs that disagree on them)."""
    segmentation = summary.get("segmentation", {})
    classification = summary.get("classification", {})
    scores: dict[str, float | None] = {name: _finite(value.get("mean")) for name, value in segmentation.items()}
    for key in ("macro_f1", "macro_auroc", "balanced_accuracy", "accuracy"):
        scores[key] = _finite(classification.get(key))
    scores["combined"] = _finite(combined_score(scores, weights)) if weights else None
    return scores


def run_crossval(cfg) -> dict:
    """Predict every fold's held-out cases, evaluate them together, write the ensemble; returns the
    contents of crossval.json."""
    cfg = OmegaConf.merge(OmegaConf.structured(CrossvalConfig), cfg)
    multirun = Path(cfg.multirun).expanduser().resolve()
    runs, index = read_sweep(multirun, cfg.checkpoint)
    out = Path(cfg.out).expanduser().resolve() if cfg.out else multirun / CROSSVAL_DIR
    settings = InferenceSettings.preset(cfg.inference)
    weights = runs[0].combined_metric  # the folds', one set (read_sweep)
    # what decides the predictions and the ensemble (the evaluation's own settings are checked by evaluate)
    identity = {"multirun": str(multirun), "checkpoint": cfg.checkpoint, "inference": settings.name,
                "precision": cfg.precision}
    folder = OutputFolder.open(out, COMMAND, identity=identity, reads=[*(run.job_dir for run in runs), index.root],
                               writes=[ENSEMBLE_FILE, SUMMARY_FILE], overwrite=cfg.overwrite, claim=False)
    cases, problems = find_cases(index.root)
    folder.claim()  # before the folds' predictions, which are folders of their own inside it
    by_id = {case.case_id: case for case in cases}
    fold_dirs, failed = [], {}
    for run in runs:
        log.info("fold %d (job %s): %d held-out case(s) with %s", run.fold, run.job_dir.name, len(run.held_out),
                 run.checkpoint)
        predictor = Predictor.from_checkpoints([run.checkpoint], settings, device=cfg.device, precision=cfg.precision)
        fold_dir = out / "predictions" / f"fold_{run.fold}"
        summary = predict_cases(predictor, [by_id[c] for c in run.held_out if c in by_id], fold_dir,
                                problems={c: problems[c] for c in run.held_out if c in problems},
                                overwrite=cfg.overwrite, save_probabilities=cfg.save_probabilities,
                                progress=cfg.progress,
                                run_info={"checkpoints": [str(run.checkpoint)], "inference": settings.name,
                                          "fold": run.fold})
        failed.update(summary.failed)
        fold_dirs.append(fold_dir)
    if failed:
        raise ValueError(f"{len(failed)} case(s) could not be predicted, so the cross-validation is incomplete:\n  "
                         + "\n  ".join(f"{case}: {reason}" for case, reason in sorted(failed.items())))
    out_of_fold = merge_out_of_fold(fold_dirs, out / "out_of_fold", overwrite=cfg.overwrite)
    evaluation = evaluate(EvaluationConfig.compose(dict(
        pred=str(out_of_fold), gt=str(index.root), out=str(out / "evaluation"), tolerance_mm=cfg.tolerance_mm,
        bootstrap=cfg.bootstrap, seed=cfg.seed, plots=cfg.plots, num_subtypes=int(runs[0].data.get("num_subtypes", 3)),
        workers=cfg.workers, progress=cfg.progress, overwrite=cfg.overwrite)))
    ensemble = out / ENSEMBLE_FILE
    if folder.may_write(ENSEMBLE_FILE):
        write_ensemble(ensemble, runs)
    result = {"multirun": str(multirun), "dataset": str(index.root), "inference": settings.name,
              "save_probabilities": bool(cfg.save_probabilities), "num_cases": len(evaluation.rows),
              "folds": [{"fold": run.fold, "job": run.job_dir.name, "checkpoint": str(run.checkpoint),
                         "held_out": run.held_out} for run in runs],
              "split": {key: runs[0].data.get(key) for key in SHARED_DATA_KEYS},
              "ensemble": str(ensemble), "combined_metric": weights,
              "scores": headline_scores(evaluation.summary, weights)}
    if folder.may_write(SUMMARY_FILE):
        save_json(result, out / SUMMARY_FILE)
    folder.record(f".{COMMAND}", [ENSEMBLE_FILE, SUMMARY_FILE])
    if cfg.wandb:
        log_crossval_run(out, multirun, result, evaluation.rows, cfg.wandb_project)
    return result


def log_crossval_run(out: Path, multirun: Path, result: Mapping, rows: Sequence[Mapping], project: str) -> Path:
    """The cross-validated summary as a W&B run of its own (job_type crossval) in the sweep's group, the
    group its training jobs logged to (``{task_name}_{sweep folder}``); the per-case table beside it."""
    job_config = yaml.safe_load((job_dirs(multirun)[0] / ".hydra" / "config.yaml").read_text()) or {}
    group = f"{job_config.get('task_name', 'train')}_{multirun.name}"
    columns = sorted({key for row in rows for key in row})
    table = (columns, [[row.get(key) for key in columns] for row in rows])
    config = {"multirun": str(multirun), "inference": result["inference"], "num_cases": result["num_cases"],
              "folds": [fold["fold"] for fold in result["folds"]]}
    return log_summary_run(out, project=project, group=group, name="crossval", job_type="crossval", config=config,
                           summary={f"crossval/{key}": value for key, value in result["scores"].items()},
                           table=table)


def read_crossval(folder: str | Path) -> dict:
    """crossval.json of a crossval folder or of a sweep folder cross-validated before."""
    path = crossval_dir(folder) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CROSSVAL_DIR}/{SUMMARY_FILE}; run pancreas-mtl crossval "
                                f"multirun={folder} first")
    return load_json(path)
