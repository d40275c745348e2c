"""The subtype head study: every run of one or more multiruns, scored the way the study reports it.

    .venv/bin/python train.py -m seed=0,1 experiment=cpu_demo model/head=multistage,single_stage,lesion_attention \
        hydra.sweep.dir=outputs/study/heads_ce logger=csv
    .venv/bin/python train.py -m seed=0,1 experiment=cpu_demo model/head=ovr loss=ovr \
        hydra.sweep.dir=outputs/study/heads_ovr logger=csv
    .venv/bin/python bench/head_study.py outputs/study/heads_ce outputs/study/heads_ovr

Per run (a job folder ``<multirun>/<n>/``): from its training log (evaluation/runs.py), the validation
macro F1 at the last validation and the best one during the run (their gap says how much the model
swings); then ``predict.py`` (``inference=fast``) with the checkpoint the inner validation split chose
(``checkpoints/epoch*-select*.ckpt``; ``last.ckpt`` without one; torch fp32 unless ``--engine`` and
``--precision``) on the validation and test splits of finished runs, and
``pancreas-mtl evaluate`` on the original grids. Per head: mean and standard deviation over seeds.
Results per run are kept in ``<run>/study/`` (a rerun skips what is there), the table is printed as
markdown for docs/benchmarks.md and written to ``<first multirun>/head_study.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench._machine import cpu_model  # noqa: E402
from pancreas_mtl.evaluation.runs import epoch_curves, find_runs, read_run_metrics, run_overrides  # noqa: E402

SPLITS = {"validation": ("validation", "validation"), "test": ("test", "test_labels")}  # images, reference
SCORES = ("whole_pancreas_dice", "lesion_dice", "macro_f1", "balanced_accuracy", "macro_auroc")


def finished(run: Path) -> bool:
    """Whether the run trained all its epochs (its log reaches ``trainer.max_epochs``)."""
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        return False
    max_epochs = int(OmegaConf.load(config).trainer.max_epochs)
    epochs = [int(e.max()) + 1 for e, _ in epoch_curves(read_run_metrics(run)).values() if e.size]
    return bool(epochs) and max(epochs) >= max_epochs


def chosen_checkpoint(run: Path) -> Path:
    selected = sorted((run / "checkpoints").glob("epoch*-select*.ckpt"))
    return selected[-1] if selected else run / "checkpoints" / "last.ckpt"


def scores(summary: dict) -> dict[str, float]:
    segmentation = summary["segmentation"]
    classification = summary.get("classification", {})
    return {"whole_pancreas_dice": segmentation["whole_pancreas_dice"]["mean"],
            "lesion_dice": segmentation["lesion_dice"]["mean"],
            **{key: classification.get(key, float("nan")) for key in ("macro_f1", "balanced_accuracy", "macro_auroc")},
            "macro_f1_ci": classification.get("ci", {}).get("macro_f1")}


def evaluate_run(run: Path, data: Path, inference: str, engine: str, precision: str) -> dict[str, dict]:
    """The run's chosen checkpoint predicted and evaluated on each split (cached in ``<run>/study/``)."""
    ckpt = chosen_checkpoint(run)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run}: no checkpoint (the run has not finished?)")
    python, cli = Path(sys.executable), Path(sys.executable).with_name("pancreas-mtl")
    results = {}
    for split, (images, reference) in SPLITS.items():
        out = run / "study" / split
        summary = out / "evaluation" / "summary.json"
        if not summary.is_file():
            subprocess.run([str(python), "predict.py", f"ckpt={ckpt}", f"input={data / images}",
                            f"output={out / 'predictions'}", f"inference={inference}",
                            f"inference.engine={engine}", f"precision={precision}"],
                           cwd=REPO_ROOT, check=True)
            subprocess.run([str(cli), "evaluate", f"pred={out / 'predictions'}", f"gt={data / reference}",
                            f"out={out / 'evaluation'}"], cwd=REPO_ROOT, check=True)
        results[split] = scores(json.loads(summary.read_text()))
    return results


def training_f1(run: Path) -> dict[str, float]:
    """Validation macro F1 at the last validation and the best during the run (training log)."""
    curves = epoch_curves(read_run_metrics(run))
    if "val/f1_macro" not in curves:
        return {"final_f1": float("nan"), "best_f1": float("nan"), "epochs": 0}
    epochs, values = curves["val/f1_macro"]
    return {"final_f1": float(values[-1]), "best_f1": float(np.nanmax(values)), "epochs": int(epochs[-1]) + 1}


def mean_sd(values: list[float]) -> str:
    values = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not values.size:
        return "-"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if values.size > 1 else f"{values.mean():.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multiruns", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "outputs" / "data" / "synthetic_default")
    parser.add_argument("--inference", default="fast")
    parser.add_argument("--engine", default="torch", help="inference.engine of the predictions")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)

    rows = []
    for folder in args.multiruns:
        for run in find_runs(folder):
            if not finished(run):
                print(f"skipped {run}: not finished", file=sys.stderr)
                continue
            overrides = run_overrides(run)
            head = overrides.get("model/head", "lesion_attention")
            row = {"run": str(run), "head": head, "seed": overrides.get("seed", "0"), **training_f1(run)}
            try:
                row.update(evaluate_run(run, args.data, args.inference, args.engine, args.precision))
            except (FileNotFoundError, subprocess.CalledProcessError) as error:
                print(f"skipped {run}: {error}", file=sys.stderr)
                continue
            rows.append(row)

    heads = sorted({row["head"] for row in rows})
    print(f"\nhead study, {date.today()}, {cpu_model()}, inference={args.inference}, engine {args.engine} "
          f"{args.precision}, checkpoint chosen on the inner validation split\n")
    print("| head | runs | val pancreas Dice | val lesion Dice | val macro F1 | val bal. acc. | val AUROC "
          "| test pancreas Dice | test lesion Dice | test macro F1 | test bal. acc. | test AUROC "
          "| final val F1 (log) | best - final F1 |")
    print("| --- " * 14 + "|")
    for head in heads:
        members = [row for row in rows if row["head"] == head]
        cells = [mean_sd([m[split][key] for m in members]) for split in SPLITS for key in SCORES]
        gaps = [m["best_f1"] - m["final_f1"] for m in members]
        print(f"| {head} | {len(members)} | " + " | ".join(cells)
              + f" | {mean_sd([m['final_f1'] for m in members])} | {mean_sd(gaps)} |")
    out = args.multiruns[0] / "head_study.json"
    out.write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nper run: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
