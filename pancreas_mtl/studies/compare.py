"""Ranking experiments by one score: cross-validated sweeps (optionally with the ensemble of every pair,
as nnU-Net's find_best_configuration does), or the jobs of fixed-split sweeps grouped over their seeds.

    pancreas-mtl compare runs=[<multirun A>,<multirun B>] out=outputs/compare [metric=lesion_dice] [ensembles=true]

Each run is a sweep folder that ``pancreas-mtl crossval`` has scored (or its ``crossval/`` folder), or
one that ``pancreas-mtl holdout`` has scored (or its ``holdout/`` folder); one comparison takes one kind.
Cross-validated: the score is read from its ``crossval.json``; ``combined`` is each run's own combined
score (its ``module.combined_metric``, recorded by crossval and holdout), so ``metric=combined`` ranks
only runs that weigh it alike (runs that disagree are refused, naming their weights). A pair ensemble
averages the two experiments' out-of-fold probabilities case by case (both must have been cross-validated with ``save_probabilities=true``): the
mask is the argmax of the mean probabilities on the input grid, the subtype the argmax of the mean
subtype probabilities, scored by the same evaluation as every experiment. Holdout-scored: the jobs of
all the sweeps that differ only in a repeat key (``seed``, ``data.fold``) are one experiment, with the
mean and standard deviation of every score per split, and of the training log's final validation F1
and its gap to the run's best; experiments are ranked on ``split`` (the validation split by default,
never the test split unless asked). compare.md holds the table for a report.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.io import read_volume
from pancreas_mtl.studies.crossval import (
    SUMMARY_FILE,
    crossval_dir,
    headline_scores,
    read_crossval,
    shared_weights,
)
from pancreas_mtl.evaluation.evaluate import EvaluationConfig, evaluate
from pancreas_mtl.studies.holdout import SUMMARY_FILE as HOLDOUT_SUMMARY
from pancreas_mtl.studies.holdout import holdout_dir, read_holdout
from pancreas_mtl.evaluation.metrics import lower_is_better
from pancreas_mtl.evaluation.runs import REPEAT_KEYS
from pancreas_mtl.files import atomic_path, save_json, write_csv
from pancreas_mtl.inference.input_grid import write_mask
from pancreas_mtl.inference.output_folder import SUBTYPE_PROBABILITIES, SUBTYPE_RESULTS
from pancreas_mtl.output_guard import OutputFolder
from pancreas_mtl.tables import Table

log = logging.getLogger(__name__)

COLUMNS = ("combined", "whole_pancreas_dice", "lesion_dice", "whole_pancreas_nsd", "lesion_nsd",
           "whole_pancreas_hd95", "lesion_hd95", "macro_f1", "macro_auroc", "balanced_accuracy")


@dataclass
class CompareConfig:
    """The keys of conf/compare.yaml (``pancreas-mtl compare --help``)."""

    runs: Any = MISSING                 # a list of folders, or one folder
    out: str = MISSING
    metric: str = MISSING
    split: str = MISSING
    ensembles: bool = MISSING
    tolerance_mm: float = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    plots: bool = MISSING
    workers: int = MISSING
    progress: bool = MISSING
    overwrite: bool = MISSING


COMMAND = "compare"
OUTPUT_FILES = ("compare.json", "compare.csv", "compare.md")


def _ensemble_pair(first: dict, second: dict, out: Path, overwrite: bool) -> Path:
    """The out-of-fold predictions of two experiments averaged into ``out`` (masks and subtype tables)."""
    folders = [Path(entry["folder"]) / "out_of_fold" for entry in (first, second)]
    for entry in (first, second):
        if not entry["crossval"].get("save_probabilities"):
            raise ValueError(f"{entry['name']}: cross-validated without probabilities; rerun pancreas-mtl crossval "
                             f"multirun={entry['crossval']['multirun']} save_probabilities=true")
    cases = [sorted(p.name[: -len(".npz")] for p in folder.glob("*.npz")) for folder in folders]
    if cases[0] != cases[1]:
        raise ValueError(f"{first['name']} and {second['name']} predicted different cases "
                         f"({len(cases[0])} vs {len(cases[1])}); an ensemble needs the same dataset")
    names = [f"{case}.nii.gz" for case in cases[0]]
    folder = OutputFolder.open(out, COMMAND, identity={"members": [str(f.resolve()) for f in folders]},
                               reads=folders, writes=[*names, SUBTYPE_RESULTS, SUBTYPE_PROBABILITIES], overwrite=overwrite)
    results, probabilities = [], []
    for case in cases[0]:
        loaded = [np.load(folder / f"{case}.npz") for folder in folders]
        mean = sum(item["probabilities"].astype(np.float32) for item in loaded) / 2  # (K, Z, Y, X)
        reference = folders[0] / f"{case}.nii.gz"
        if folder.may_write(f"{case}.nii.gz"):
            write_mask(np.argmax(mean, axis=0), read_volume(reference).affine, out / f"{case}.nii.gz", reference)
        subtype = [item["subtype_probabilities"] for item in loaded]
        if all(s.size for s in subtype):
            mean_subtype = (subtype[0] + subtype[1]) / 2
            results.append((f"{case}.nii.gz", int(np.argmax(mean_subtype))))
            probabilities.append((f"{case}.nii.gz", *(f"{p:.6f}" for p in mean_subtype)))
    tables = []
    if results:
        write_csv(out / SUBTYPE_RESULTS, ["Names", "Subtype"], results)
        write_csv(out / SUBTYPE_PROBABILITIES, ["Names", *(f"p{k}" for k in range(len(probabilities[0]) - 1))],
                  probabilities)
        tables = [SUBTYPE_RESULTS, SUBTYPE_PROBABILITIES]
    folder.record(f".{COMMAND}", [*names, *tables])
    return out


def _is_holdout(name: str) -> bool:
    return (holdout_dir(name) / HOLDOUT_SUMMARY).is_file()


def _crossval_rows(cfg, names: list[str], output: OutputFolder) -> list[dict]:
    """One row per cross-validated sweep, and with ``ensembles`` one per pair of them (in ``output``)."""
    out = output.path
    entries = []
    for name in names:
        summary = read_crossval(name)
        entries.append({"name": name, "folder": str(crossval_dir(name).resolve()), "crossval": summary,
                        "scores": summary["scores"]})
    datasets = {entry["crossval"]["dataset"] for entry in entries}
    if len(datasets) > 1:
        raise ValueError(f"the runs were cross-validated on different datasets ({', '.join(sorted(datasets))}); "
                         "their scores are not comparable")
    rows = [{"name": entry["name"], "members": [entry["name"]], "folder": entry["folder"],
             "num_cases": entry["crossval"]["num_cases"],
             "combined_metric": entry["crossval"].get("combined_metric"),
             **{k: entry["scores"].get(k) for k in COLUMNS}} for entry in entries]
    if cfg.ensembles:
        output.claim()
        for first, second in itertools.combinations(entries, 2):
            label = f"{first['name']} + {second['name']}"
            folder = out / "ensembles" / f"{entries.index(first)}+{entries.index(second)}"
            log.info("ensemble %s -> %s", label, folder)
            predictions = _ensemble_pair(first, second, folder / "predictions", cfg.overwrite)
            evaluation = evaluate(EvaluationConfig.compose(dict(
                pred=str(predictions), gt=first["crossval"]["dataset"], out=str(folder / "evaluation"),
                tolerance_mm=cfg.tolerance_mm, bootstrap=cfg.bootstrap, seed=cfg.seed, plots=cfg.plots,
                num_subtypes=int(first["crossval"]["split"].get("num_subtypes") or 3), workers=cfg.workers,
                progress=cfg.progress, overwrite=cfg.overwrite)))
            # the members' weights where they share them; none (no combined score) where they differ
            members = [entry["crossval"].get("combined_metric") for entry in (first, second)]
            weights = members[0] if members[0] == members[1] else None
            scores = headline_scores(evaluation.summary, weights)
            rows.append({"name": label, "members": [first["name"], second["name"]], "folder": str(folder),
                         "num_cases": len(evaluation.rows), "combined_metric": weights,
                         **{k: scores.get(k) for k in COLUMNS}})
    return rows


def _mean_sd(values) -> tuple[float | None, float | None]:
    """Mean and standard deviation (ddof 1; 0 for one value) of the defined values; None without any."""
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None, None
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def experiment_names(jobs: list[dict]) -> list[str]:
    """Each job's experiment: its overrides without the repeat keys (and the holdout's checkpoint rule),
    named by those in which the experiments differ (all of them when there is one experiment;
    ``(defaults)`` without any)."""
    kept = [{**{k: v for k, v in job["overrides"].items() if k.lstrip("+~") not in REPEAT_KEYS},
             **({"checkpoint": job["rule"]} if "rule" in job else {})} for job in jobs]
    distinct = {tuple(sorted(o.items())) for o in kept}
    shared = set.intersection(*(set(o) for o in distinct)) if len(distinct) > 1 else set()
    return [" ".join(f"{k}={v}" for k, v in o.items() if (k, v) not in shared) or "(defaults)" for o in kept]


def _holdout_rows(cfg, names: list[str]) -> tuple[list[dict], list[str]]:
    """One row per experiment over every job of the holdout-scored sweeps, and the splits they were scored on."""
    if cfg.ensembles:
        raise ValueError("ensembles=true averages out-of-fold probabilities of cross-validated sweeps; "
                         f"{', '.join(names)} were scored by pancreas-mtl holdout")
    summaries = [read_holdout(name) for name in names]
    datasets = {summary["dataset"] for summary in summaries}
    if len(datasets) > 1:
        raise ValueError(f"the runs were scored on different datasets ({', '.join(sorted(datasets))}); "
                         "their scores are not comparable")
    splits = list(dict.fromkeys(split for summary in summaries for split in summary["splits"]))
    if cfg.split not in splits:
        raise ValueError(f"split={cfg.split}: the runs were scored on {', '.join(splits)} only")
    jobs = [{**job, "rule": summary["checkpoint"]} for summary in summaries for job in summary["jobs"]]
    groups: dict[str, list[dict]] = {}
    for name, job in zip(experiment_names(jobs), jobs):
        groups.setdefault(name, []).append(job)
    rows = []
    for name, members in groups.items():
        recorded = {job["folder"]: job["combined_metric"] for job in members if job.get("combined_metric")}
        row = {"name": name, "members": [job["folder"] for job in members], "runs": len(members), "splits": splits,
               "combined_metric": shared_weights(Path(name), recorded) if recorded else None,
               "num_cases": {split: max((job["scores"].get(split, {}).get("num_cases") or 0) for job in members)
                             for split in splits}}
        for split in splits:
            for column in COLUMNS:
                row[f"{split}/{column}"], row[f"{split}/{column}_sd"] = _mean_sd(
                    job["scores"].get(split, {}).get(column) for job in members)
        training = [job["training"] for job in members]
        row["final_f1"], row["final_f1_sd"] = _mean_sd(t["final_f1"] for t in training)
        row["best_minus_final_f1"], row["best_minus_final_f1_sd"] = _mean_sd(
            t["best_f1"] - t["final_f1"] for t in training if t["final_f1"] is not None)
        rows.append(row)
    return rows, splits


def compare(cfg) -> list[dict]:
    """Rank ``cfg.runs`` (and with ``ensembles`` every pair) by ``cfg.metric``; writes compare.json,
    compare.csv and compare.md to ``cfg.out`` and returns the ranked rows."""
    cfg = OmegaConf.merge(OmegaConf.structured(CompareConfig), cfg)
    if cfg.metric not in COLUMNS:
        raise ValueError(f"unknown metric {cfg.metric!r}; choose one of {', '.join(COLUMNS)}")
    names = [str(run) for run in cfg.runs] if OmegaConf.is_list(cfg.runs) else [str(cfg.runs)]
    if len(set(names)) != len(names) or len(names) < 1:
        raise ValueError(f"runs must name distinct scored sweep folders, got {names}")
    out = Path(cfg.out).expanduser()
    identity = {"runs": [str(Path(name).expanduser().resolve()) for name in names],
                **{key: cfg[key] for key in ("metric", "split", "ensembles")}}
    output = OutputFolder.open(out, COMMAND, identity=identity, reads=names, writes=OUTPUT_FILES,
                               overwrite=cfg.overwrite, claim=False)  # claimed once the runs are read
    holdout = [name for name in names if _is_holdout(name)]
    if holdout and len(holdout) != len(names):
        raise ValueError(f"runs mixes holdout-scored sweeps ({', '.join(holdout)}) with others "
                         f"({', '.join(n for n in names if n not in holdout)}); compare one kind at a time")
    if holdout:
        rows, splits = _holdout_rows(cfg, names)
        key_column = f"{cfg.split}/{cfg.metric}"
    else:
        rows, splits = _crossval_rows(cfg, names, output), []
        key_column = cfg.metric
    if cfg.metric == "combined":
        check_same_combined(rows)
    worst = float("inf") if lower_is_better(cfg.metric) else float("-inf")

    def key(row: dict) -> float:
        value = row.get(key_column)
        value = worst if value is None else value  # headline_scores made undefined scores None
        return value if lower_is_better(cfg.metric) else -value

    rows.sort(key=key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    output.claim()
    if output.may_write("compare.json"):
        save_json({"metric": cfg.metric, "split": cfg.split if holdout else None,
                   "lower_is_better": lower_is_better(cfg.metric),
                   "source": HOLDOUT_SUMMARY if holdout else SUMMARY_FILE, "splits": splits, "ranking": rows},
                  out / "compare.json")
    if not output.may_write("compare.csv"):
        pass
    elif holdout:
        columns = ["rank", "name", "runs", *(f"{split}/{c}{sd}" for split in splits for c in COLUMNS for sd in ("", "_sd")),
                   "final_f1", "final_f1_sd", "best_minus_final_f1", "best_minus_final_f1_sd"]
        Table([{**row, "members": " ".join(row["members"])} for row in rows],
              columns=[*columns, "members"]).to_csv(out / "compare.csv")
    else:
        write_csv(out / "compare.csv", ["rank", "name", "num_cases", *COLUMNS, "folder"],
                  [[row["rank"], row["name"], row["num_cases"], *(_cell(row.get(c)) for c in COLUMNS), row["folder"]]
                   for row in rows])
    if output.may_write("compare.md"):
        with atomic_path(out / "compare.md") as tmp:
            tmp.write_text(report_table(rows, cfg.metric).to_markdown() + "\n")
    output.record(f".{COMMAND}", OUTPUT_FILES)
    return rows


def check_same_combined(rows: list[dict]) -> None:
    """ValueError naming the rows when they weigh the combined score differently (each is its run's own,
    ``module.combined_metric``), so that ranking them by it would rank different scores; rows that record
    no weights (summaries written before they were recorded) are not compared."""
    distinct: dict[str, list[str]] = {}
    for row in rows:
        if row.get("combined_metric"):
            distinct.setdefault(repr(dict(sorted(row["combined_metric"].items()))), []).append(row["name"])
    if len(distinct) > 1:
        listed = "\n  ".join(f"{', '.join(names)}: {weights}" for weights, names in distinct.items())
        raise ValueError("metric=combined: the runs weigh their combined score differently "
                         f"(module.combined_metric), so it ranks different scores:\n  {listed}\nrank them by one score instead, e.g. "
                         f"metric=lesion_dice (one of {', '.join(COLUMNS[1:])})")


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}"


REPORTED = ("whole_pancreas_dice", "lesion_dice", "macro_f1", "balanced_accuracy", "macro_auroc")


def report_table(rows: list[dict], metric: str) -> Table:
    """The ranking for a report: cross-validated scores, or per split ``mean ± sd`` over the seeds of each
    experiment with the training log's final validation F1 and its gap to the run's best."""
    splits = rows[0].get("splits") if rows else None
    if not splits:
        shown = [metric, *(c for c in ("combined", *REPORTED) if c != metric)]
        return Table([{"rank": row["rank"], "experiment": row["name"], "cases": row["num_cases"],
                       **{c: row.get(c) for c in shown}} for row in rows])

    def spread(row: dict, name: str) -> str:
        mean, sd = row.get(name), row.get(f"{name}_sd")
        return "" if mean is None else f"{mean:.3f}" + (f" ± {sd:.3f}" if row["runs"] > 1 else "")

    shown = [metric, *(c for c in REPORTED if c != metric)]
    return Table([{"rank": row["rank"], "experiment": row["name"], "runs": row["runs"],
                   **{f"{split} {c}": spread(row, f"{split}/{c}") for split in splits for c in shown},
                   "final val F1 (log)": spread(row, "final_f1"), "best - final F1": spread(row, "best_minus_final_f1")}
                  for row in rows])


def format_ranking(rows: list[dict], metric: str) -> str:
    """The ranking as a text table, the ranked metric first."""
    if not rows[0].get("splits"):
        shown = [metric, *(c for c in ("combined", "whole_pancreas_dice", "lesion_dice", "macro_f1") if c != metric)]
        width = max(len(row["name"]) for row in rows)
        lines = [f"{'rank':>4}  {'experiment':<{width}}  " + "  ".join(f"{c:>19}" for c in shown)]
        for row in rows:
            values = "  ".join(f"{_cell(row.get(c)) or 'n/a':>19}" for c in shown)
            lines.append(f"{row['rank']:>4}  {row['name']:<{width}}  {values}")
        return "\n".join(lines)
    return str(report_table(rows, metric))


def ranking_table(folders, out: str | Path, metric: str = "combined", **settings) -> Table:
    """``pancreas-mtl compare`` of scored sweeps (conf/compare.yaml's defaults, ``settings`` over them) as
    the report's table, written to ``out`` as well; no folders: an empty table (for notebooks)."""
    if not folders:
        return Table([], columns=["rank", "experiment", "cases", *COLUMNS], title="no scored sweeps given")
    cfg = OmegaConf.merge(OmegaConf.load(config_dir() / "compare.yaml"),
                          {"runs": [str(f) for f in folders], "out": str(out), "metric": metric, **settings})
    rows = compare(cfg)
    table = report_table(rows, metric)
    table.title = f"experiments ranked by {metric}"
    return table
