"""Training runs of the accuracy studies (bench/warm_start_study.py, bench/small_data_study.py): one
``train.py`` process per run in its own folder, its validation curve read back from the CSV log.

A run whose folder already holds a ``last.ckpt`` at the step budget is read, not run again, so a killed
study resumes where it stopped.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("val/whole_pancreas_dice", "val/lesion_dice", "val/macro_f1")
# the demo recipe on a folder, every training case trained on, live weights (no average), CSV log only
COMMON = ["experiment=cpu_demo", "data=folder", "data.inner_validation.cases=0", "callbacks.weight_averaging=null",
          "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "logger=csv",
          "module.num_overlays=0", "data.progress=false"]


def run_train(run_dir: Path, steps: int, val_every: int, overrides: list[str], log_file: Path) -> None:
    """``train.py`` for ``steps`` optimizer steps (epochs of ``val_every`` steps, validated after each)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        import torch

        if torch.load(last, weights_only=True, map_location="cpu")["global_step"] >= steps:
            return
    if steps % val_every:
        raise SystemExit(f"the step budget {steps} is not a multiple of the validation interval {val_every}")
    command = [sys.executable, "train.py", *COMMON, f"data.iterations_per_epoch={val_every}",
               f"trainer.max_epochs={steps // val_every}", "trainer.check_val_every_n_epoch=1",
               f"hydra.run.dir={run_dir}", f"paths.output_root={run_dir.parents[1]}", *overrides]
    started = time.time()
    with log_file.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "WANDB_MODE": "offline"})
    print(f"  {run_dir.name}: {time.time() - started:.0f} s", flush=True)


def curve(run_dir: Path) -> list[dict]:
    """The validation rows of a run's metrics.csv: step and the METRICS."""
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(METRICS[0]):
                rows.append({"step": int(row["step"]) + 1,
                             **{m: float(row[m]) if row.get(m) else float("nan") for m in METRICS}})
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
