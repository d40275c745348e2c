"""Training runs as they are logged: Lightning's CSV logs (``<run>/csv/version_N/metrics.csv``) read into
per-epoch learning curves, the learning-curve figure, and tables of a run or of a Hydra multirun
(``<multirun>/<n>/``) with the mean and spread over seeds or folds.

A run folder is what train.py writes (conf/hydra/default.yaml, conf/logger/csv.yaml): ``.hydra/`` (the
config and the overrides), ``csv/version_N/metrics.csv`` (a new version each time the run is resumed).
The CSV has one row per logging call: ``epoch``, ``step`` and the metrics logged then, empty elsewhere;
a metric logged per step and per epoch has two columns, ``name_step`` and ``name_epoch``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from pancreas_mtl.evaluation.figures import new_figure, save_figure
from pancreas_mtl.evaluation.metrics import lower_is_better
from pancreas_mtl.tables import Table

METRICS_FILE = "metrics.csv"
CSV_LOG_DIR = "csv"       # conf/logger/csv.yaml: name
LEARNING_CURVES_FILE = "learning_curves.png"
# overrides that repeat an experiment rather than change it: the runs differing only in these are grouped
REPEAT_KEYS = ("seed", "data.fold")
# validation scores: val/* on the validation split, select/* on the inner split that picks the checkpoint
VALIDATION_PREFIXES = ("val/", "select/")
Curves = dict[str, tuple[np.ndarray, np.ndarray]]


# --- reading the CSV logs -----------------------------------------------------------------------------

def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of one Lightning ``metrics.csv``: {column: value} with the empty cells left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} not found (a run logs it with logger=csv or many_loggers)")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        if not reader.fieldnames or not {"epoch", "step"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: not a Lightning CSV log, expected columns epoch and step, found "
                             f"{reader.fieldnames}")
        return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in reader]


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(match[1]) if match else -1


def metrics_files(run_dir: str | Path) -> list[Path]:
    """A run's ``csv/version_N/metrics.csv`` files, oldest version first."""
    run_dir = Path(run_dir)
    return sorted((run_dir / CSV_LOG_DIR).glob(f"version_*/{METRICS_FILE}"), key=_version)


def read_run_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of every version of a run's CSV log; a resumed version replaces the rows from its first step on."""
    files = metrics_files(run_dir)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no {CSV_LOG_DIR}/version_N/{METRICS_FILE} (is it a train.py run folder "
                                "with logger=csv or many_loggers?)")
    rows: list[dict[str, float]] = []
    for path in files:
        newer = read_metrics(path)
        if newer:
            first = min(row["step"] for row in newer)
            rows = [row for row in rows if row["step"] < first] + newer
    return rows


def epoch_curves(rows: Sequence[Mapping[str, float]]) -> Curves:
    """{metric: (epochs, values)}: the epoch-level metrics (``*_epoch`` named without the suffix, ``val/*``,
    learning rates ``lr-*`` as the last value of each epoch); per-step columns (``*_step``) are left out."""
    per_epoch: dict[str, dict[int, float]] = {}
    for row in rows:
        epoch = int(row["epoch"]) if "epoch" in row else None
        if epoch is None:
            continue
        for key, value in row.items():
            if key in ("epoch", "step") or key.endswith("_step"):
                continue
            name = key[: -len("_epoch")] if key.endswith("_epoch") else key
            per_epoch.setdefault(name, {})[epoch] = value
    return {name: (np.array(sorted(values)), np.array([values[e] for e in sorted(values)]))
            for name, values in sorted(per_epoch.items())}


# --- figures -------------------------------------------------------------------------------------------

def learning_curves_figure(curves: Curves, title: str = ""):
    """Three panels over epochs: training losses, validation metrics, learning rate."""
    panels = [("training loss", [n for n in curves if n.startswith("train/")]),
              ("validation", [n for n in curves if n.startswith(VALIDATION_PREFIXES) and not re.search(r"_\d+$", n)]),
              ("learning rate", [n for n in curves if n.startswith("lr")])]
    figure = new_figure(figsize=(13, 3.8))
    axes = figure.subplots(1, 3)
    for axis, (name, keys) in zip(axes, panels):
        for key in keys:
            epochs, values = curves[key]
            axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=key)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        if keys:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="grey")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def run_curves_figures(folders: str | Path | Sequence[str | Path]) -> list:
    """The learning curves of every run of ``folders`` (runs or multiruns), one figure each."""
    return [learning_curves_figure(epoch_curves(read_run_metrics(run_dir)), str(run_dir))
            for _, run_dir in _named_runs(folders)]


def metric_over_epochs_figure(folders: str | Path | Sequence[str | Path], metrics: Sequence[str] = (
        "val/combined", "val/whole_pancreas_dice", "val/lesion_dice", "val/macro_f1")):
    """One panel per metric, one line per run of ``folders`` (runs or multiruns) over epochs."""
    figure = new_figure(figsize=(4.2 * len(metrics), 3.8))
    axes = np.atleast_1d(figure.subplots(1, len(metrics)))
    for name, run_dir in _named_runs(folders):
        curves = epoch_curves(read_run_metrics(run_dir))
        for axis, metric in zip(axes, metrics):
            if metric in curves:
                axis.plot(*curves[metric], marker="o", markersize=3, label=name)
    for axis, metric in zip(axes, metrics):
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def write_learning_curves(metrics_csv: str | Path, png: str | Path | None = None) -> Path:
    """The learning-curve PNG of one ``metrics.csv`` (default: ``learning_curves.png`` beside it)."""
    metrics_csv = Path(metrics_csv)
    png = Path(png) if png is not None else metrics_csv.with_name(LEARNING_CURVES_FILE)
    curves = epoch_curves(read_metrics(metrics_csv))
    return save_figure(learning_curves_figure(curves, str(metrics_csv.parent)), png)


# --- runs and multiruns ----------------------------------------------------------------------------------

def _job_number(path: Path) -> tuple:
    return (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name)


def find_runs(folder: str | Path) -> list[Path]:
    """The run folders of ``folder``: itself when it is a run (has ``csv/``), else its job folders (a multirun)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} not found")
    if metrics_files(folder):
        return [folder]
    jobs = sorted((p for p in folder.iterdir() if p.is_dir() and metrics_files(p)), key=_job_number)
    if not jobs:
        raise ValueError(f"{folder}: neither a run folder ({CSV_LOG_DIR}/version_N/{METRICS_FILE}) nor a multirun "
                         f"folder with such runs in <n>/")
    return jobs


def run_overrides(run_dir: Path) -> dict[str, str]:
    """The command-line overrides of a run (``.hydra/overrides.yaml``), {key: value}; {} without the file."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    entries = yaml.safe_load(path.read_text()) or []
    return dict(entry.split("=", 1) if "=" in entry else (entry, "") for entry in entries)


def best_epoch(curves: Curves, metric: str) -> int | None:
    """The epoch with the best ``metric`` (lower for HD95, else higher), None when it was never logged."""
    if metric not in curves:
        return None
    epochs, values = curves[metric]
    finite = np.isfinite(values)
    if not finite.any():
        return None
    pick = np.nanargmin if lower_is_better(metric) else np.nanargmax
    return int(epochs[pick(np.where(finite, values, np.nan))])


def _at(curves: Curves, name: str, epoch: int | None) -> float | None:
    if epoch is None or name not in curves:
        return None
    epochs, values = curves[name]
    hit = np.flatnonzero(epochs == epoch)
    return float(values[hit[0]]) if hit.size else None


def _named_runs(folders: str | Path | Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(name, run folder) of every run of ``folders``: the job number, prefixed by its folder's name when
    several folders are given."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if not folders:
        raise ValueError("no run folder given")
    return [(run_dir.name if len(folders) == 1 else f"{Path(folder).name}/{run_dir.name}", run_dir)
            for folder in folders for run_dir in find_runs(folder)]


def runs_table(folders: str | Path | Sequence[str | Path], metric: str = "val/combined") -> Table:
    """One row per run of ``folders`` (runs or multiruns): overrides, epochs, the best epoch by ``metric``
    and every validation metric at that epoch."""
    rows = []
    for name, run_dir in _named_runs(folders):
        curves = epoch_curves(read_run_metrics(run_dir))
        best = best_epoch(curves, metric)
        epochs = max((int(e.max()) + 1 for e, _ in curves.values() if e.size), default=0)
        row = {"run": name, "overrides": " ".join(f"{k}={v}" for k, v in run_overrides(run_dir).items()),
               "epochs": epochs, "best_epoch": best}
        row.update({name: _at(curves, name, best) for name in curves if name.startswith(VALIDATION_PREFIXES)})
        rows.append(row)
    return Table(rows, title=f"validation metrics at each run's best epoch by {metric}")


def group_runs(runs: Table, repeat_keys: Sequence[str] = REPEAT_KEYS) -> Table:
    """Runs that differ only in ``repeat_keys`` (seeds, folds) as one row: their number, and the mean and
    standard deviation (ddof 1; 0 for one run) of every validation metric."""
    groups: dict[str, list[dict]] = {}
    for row in runs:
        kept = [o for o in row["overrides"].split() if o.split("=", 1)[0].lstrip("+~") not in repeat_keys]
        groups.setdefault(" ".join(kept) or "(defaults)", []).append(row)
    metrics = [c for c in runs.columns if c.startswith(VALIDATION_PREFIXES)]
    out = []
    for name, members in groups.items():
        row = {"experiment": name, "runs": len(members)}
        for metric in metrics:
            values = np.array([m[metric] for m in members if m.get(metric) is not None], dtype=np.float64)
            values = values[np.isfinite(values)]
            row[f"{metric} mean"] = float(values.mean()) if values.size else None
            row[f"{metric} sd"] = float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else None)
        out.append(row)
    return Table(out, title=f"mean and sd over {', '.join(repeat_keys)}")
