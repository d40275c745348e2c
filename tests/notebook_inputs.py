"""Inputs the notebooks and dashboards read, made small: the tiny synthetic set, predictions made from its
validation masks with known mistakes, an evaluation of them, and training runs' CSV logs written by
Lightning's own CSVLogger (the format train.py's runs have) in a run and a multirun folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.raw.layout import discover

LESION = 2


def tiny_dataset(root: Path, train=(2, 2, 2), validation=(2, 2, 2), test=(1, 1, 1)) -> Path:
    """The tiny synthetic preset with fewer cases (about a second)."""
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    config = load_config("tiny")
    config.train_counts, config.validation_counts, config.test_counts = train, validation, test
    return generate_dataset(root, config, progress=False)


def _mistake(mask: np.ndarray, which: int) -> np.ndarray:
    """A prediction with a known mistake: exact, lesion dilated (over-segmented), lesion missed, shifted."""
    pred = mask.copy()
    lesion = mask == LESION
    if which % 4 == 1:
        pred[ndimage.binary_dilation(lesion, iterations=2)] = LESION
    elif which % 4 == 2:
        pred[lesion] = 1
    elif which % 4 == 3:
        pred = np.roll(mask, 1, axis=2)
    return pred


def predictions(dataset: Path, out: Path, split: str = "validation") -> Path:
    """Masks of ``split`` with known mistakes, subtype_results.csv (one wrong) and subtype_probabilities.csv."""
    cases = [c for c in discover(dataset).labelled if c.split == split]
    out.mkdir(parents=True, exist_ok=True)
    results, probabilities = ["Names,Subtype"], ["Names,p0,p1,p2"]
    for number, case in enumerate(cases):
        truth = read_volume(case.label_path)
        write_nifti(_mistake(np.rint(truth.array).astype(np.uint8), number), truth.affine,
                    out / f"{case.case_id}.nii.gz")
        predicted = case.subtype if number != 1 else (case.subtype + 1) % 3
        p = np.full(3, 0.15)
        p[predicted] = 0.7
        results.append(f"{case.case_id}.nii.gz,{predicted}")
        probabilities.append(f"{case.case_id}.nii.gz," + ",".join(f"{v:.3f}" for v in p))
    (out / "subtype_results.csv").write_text("\n".join(results) + "\n")
    (out / "subtype_probabilities.csv").write_text("\n".join(probabilities) + "\n")
    return out


def evaluation(dataset: Path, pred: Path, out: Path) -> Path:
    """``pancreas-mtl evaluate`` of ``pred`` against the validation split, plots included."""
    from pancreas_mtl.evaluation.evaluate import evaluate

    evaluate({"pred": str(pred), "gt": str(dataset), "splits": ["validation"], "out": str(out), "bootstrap": 20,
              "progress": False})
    return out


def training_run(run_dir: Path, epochs: int = 4, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """A run folder as train.py leaves it: .hydra/overrides.yaml and csv/version_0/metrics.csv with the
    module's metric names, logged per step and per epoch as Lightning logs them."""
    from lightning.pytorch.loggers import CSVLogger

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    logger = CSVLogger(save_dir=str(run_dir), name="csv", version=0)
    rng = np.random.default_rng(seed)
    step = 0
    for epoch in range(epochs):
        for _ in range(3):
            loss = 2.0 / (1 + step) + rng.uniform(0, 0.05)
            logger.log_metrics({"train/loss_step": loss, "train/seg_step": loss * 0.7, "lr-SGD": 0.01 / (1 + step),
                                "epoch": epoch}, step=step)
            step += 1
        logger.log_metrics({"train/loss_epoch": 2.0 / (1 + step), "train/seg_epoch": 1.4 / (1 + step),
                            "train/cls_epoch": 0.6 / (1 + step), "epoch": epoch}, step=step - 1)
        quality = 1 - 0.8 / (1 + epoch) - rng.uniform(0, 0.05)
        logger.log_metrics({"val/whole_pancreas_dice": quality, "val/lesion_dice": quality * 0.8, "val/macro_f1": quality * 0.9,
                            "val/auroc": quality, "val/auroc_0": quality, "val/combined": quality * 0.9,
                            "epoch": epoch}, step=step - 1)
    logger.save()
    return run_dir


def multirun(folder: Path, seeds=(1, 2), experiments=("model/head=single_stage", "model/head=multistage")) -> Path:
    """A sweep folder <n>/ of training runs: every experiment with every seed."""
    number = 0
    for experiment in experiments:
        for seed in seeds:
            training_run(folder / str(number), seed=seed, overrides=(experiment,))
            number += 1
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return folder


def crossval_summary(sweep: Path, dataset: Path, combined: float) -> Path:
    """``<sweep>/crossval/crossval.json`` as ``pancreas-mtl crossval`` writes it, with the scores compare ranks."""
    from pancreas_mtl.files import save_json

    scores = {"combined": combined, "whole_pancreas_dice": combined + 0.1, "lesion_dice": combined - 0.1,
              "macro_f1": combined, "macro_auroc": combined, "balanced_accuracy": combined}
    return save_json({"multirun": str(sweep), "dataset": str(dataset), "inference": "fast", "num_cases": 6,
                      "save_probabilities": False, "folds": [], "split": {}, "scores": scores},
                     sweep / "crossval" / "crossval.json")
