"""Ranking cross-validated experiments by one score, optionally with the ensemble of every pair (as
nnU-Net's find_best_configuration does).

    pancreas-mtl compare runs=[<multirun A>,<multirun B>] out=outputs/compare [metric=lesion_dice] [ensembles=true]

Each run is a sweep folder that ``pancreas-mtl crossval`` has scored (or its ``crossval/`` folder). The
score is read from its ``crossval.json``; ``combined`` is the mean of whole-pancreas Dice, lesion Dice
and macro F1. A pair ensemble averages the two experiments' out-of-fold probabilities case by case
(both must have been cross-validated with ``save_probabilities=true``): the mask is the argmax of the
mean probabilities on the input grid, the subtype the argmax of the mean subtype probabilities, scored
by the same evaluation as every experiment.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from pancreas_mtl.data.io import read_volume
from pancreas_mtl.evaluation.crossval import SUMMARY_FILE, crossval_dir, headline_scores, read_crossval
from pancreas_mtl.evaluation.evaluate import EvaluationConfig, evaluate
from pancreas_mtl.files import save_json, write_csv
from pancreas_mtl.inference.export import write_mask
from pancreas_mtl.inference.output_folder import SUBTYPE_PROBABILITIES, SUBTYPE_RESULTS

log = logging.getLogger(__name__)

COLUMNS = ("combined", "whole_pancreas_dice", "lesion_dice", "whole_pancreas_nsd", "lesion_nsd",
           "whole_pancreas_hd95", "lesion_hd95", "macro_f1", "macro_auroc", "balanced_accuracy")


@dataclass
class CompareConfig:
    """The keys of conf/compare.yaml (``pancreas-mtl compare --help``)."""

    runs: Any = MISSING                 # a list of folders, or one folder
    out: str = MISSING
    metric: str = MISSING
    ensembles: bool = MISSING
    tolerance_mm: float = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    plots: bool = MISSING
    workers: int = MISSING
    progress: bool = MISSING


def lower_is_better(metric: str) -> bool:
    return metric.endswith("_hd95")


def _ensemble_pair(first: dict, second: dict, out: Path) -> Path:
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
    out.mkdir(parents=True, exist_ok=True)
    results, probabilities = [], []
    for case in cases[0]:
        loaded = [np.load(folder / f"{case}.npz") for folder in folders]
        mean = sum(item["probabilities"].astype(np.float32) for item in loaded) / 2  # (K, Z, Y, X)
        reference = folders[0] / f"{case}.nii.gz"
        write_mask(np.argmax(mean, axis=0), read_volume(reference).affine, out / f"{case}.nii.gz", reference)
        subtype = [item["subtype_probabilities"] for item in loaded]
        if all(s.size for s in subtype):
            mean_subtype = (subtype[0] + subtype[1]) / 2
            results.append((f"{case}.nii.gz", int(np.argmax(mean_subtype))))
            probabilities.append((f"{case}.nii.gz", *(f"{p:.6f}" for p in mean_subtype)))
    if results:
        write_csv(out / SUBTYPE_RESULTS, ["Names", "Subtype"], results)
        write_csv(out / SUBTYPE_PROBABILITIES, ["Names", *(f"p{k}" for k in range(len(probabilities[0]) - 1))],
                  probabilities)
    return out


def compare(cfg) -> list[dict]:
    """Rank ``cfg.runs`` (and with ``ensembles`` every pair) by ``cfg.metric``; writes compare.json and
    compare.csv to ``cfg.out`` and returns the ranked rows."""
    cfg = OmegaConf.merge(OmegaConf.structured(CompareConfig), cfg)
    if cfg.metric not in COLUMNS:
        raise ValueError(f"unknown metric {cfg.metric!r}; choose one of {', '.join(COLUMNS)}")
    names = [str(run) for run in cfg.runs] if OmegaConf.is_list(cfg.runs) else [str(cfg.runs)]
    if len(set(names)) != len(names) or len(names) < 1:
        raise ValueError(f"runs must name distinct cross-validated sweep folders, got {names}")
    out = Path(cfg.out).expanduser()
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
             "num_cases": entry["crossval"]["num_cases"], **{k: entry["scores"].get(k) for k in COLUMNS}}
            for entry in entries]
    if cfg.ensembles:
        for first, second in itertools.combinations(entries, 2):
            label = f"{first['name']} + {second['name']}"
            folder = out / "ensembles" / f"{entries.index(first)}+{entries.index(second)}"
            log.info("ensemble %s -> %s", label, folder)
            predictions = _ensemble_pair(first, second, folder / "predictions")
            evaluation = evaluate(EvaluationConfig(
                pred=str(predictions), gt=first["crossval"]["dataset"], out=str(folder / "evaluation"),
                tolerance_mm=cfg.tolerance_mm, bootstrap=cfg.bootstrap, seed=cfg.seed, plots=cfg.plots,
                num_subtypes=int(first["crossval"]["split"].get("num_subtypes") or 3), workers=cfg.workers,
                progress=cfg.progress))
            scores = headline_scores(evaluation.summary)
            rows.append({"name": label, "members": [first["name"], second["name"]], "folder": str(folder),
                         "num_cases": len(evaluation.rows), **{k: scores.get(k) for k in COLUMNS}})
    worst = float("inf") if lower_is_better(cfg.metric) else float("-inf")

    def key(row: dict) -> float:
        value = row.get(cfg.metric)
        value = worst if value is None else value  # headline_scores made undefined scores None
        return value if lower_is_better(cfg.metric) else -value

    rows.sort(key=key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    out.mkdir(parents=True, exist_ok=True)
    save_json({"metric": cfg.metric, "lower_is_better": lower_is_better(cfg.metric), "source": SUMMARY_FILE,
               "ranking": rows}, out / "compare.json")
    write_csv(out / "compare.csv", ["rank", "name", "num_cases", *COLUMNS, "folder"],
              [[row["rank"], row["name"], row["num_cases"], *(_cell(row.get(c)) for c in COLUMNS), row["folder"]]
               for row in rows])
    return rows


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}"


def format_ranking(rows: list[dict], metric: str) -> str:
    """The ranking as a text table, the ranked metric first."""
    shown = [metric, *(c for c in ("combined", "whole_pancreas_dice", "lesion_dice", "macro_f1") if c != metric)]
    width = max(len(row["name"]) for row in rows)
    lines = [f"{'rank':>4}  {'experiment':<{width}}  " + "  ".join(f"{c:>19}" for c in shown)]
    for row in rows:
        values = "  ".join(f"{_cell(row.get(c)) or 'n/a':>19}" for c in shown)
        lines.append(f"{row['rank']:>4}  {row['name']:<{width}}  {values}")
    return "\n".join(lines)
