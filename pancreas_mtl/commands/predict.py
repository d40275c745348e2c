"""Predict masks and lesion subtypes: ``python predict.py ckpt=... input=... output=... [inference=accurate]``,
or ``pancreas-mtl predict ...`` from an installed package.

Composes conf/predict.yaml, loads the checkpoint(s) (weights, plan and config; an ensemble when
``ckpt`` is a list), finds the cases in ``input``, and predicts each one into ``output``: mask
``{case}.nii.gz`` on the input's grid, ``subtype_results.csv``, ``subtype_probabilities.csv`` and
``timings.csv``. Finished cases are skipped on a rerun (``overwrite=true`` redoes them); a case that
fails is reported and the others go on; the exit code is 1 when any case failed. See docs/inference.md.
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.inference.checkpoint import expand_checkpoints
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import RunSummary, predict_cases
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.commands.refusals import one_line_refusals

log = logging.getLogger("predict")


def _as_list(value) -> list:
    if value is None:
        return []
    plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return [str(v) for v in plain] if isinstance(plain, (list, tuple)) else [str(plain)]


def predict(cfg: DictConfig) -> RunSummary:
    """The whole run for a composed config; returns what was predicted, skipped and failed."""
    threads = cfg.get("num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"num_threads must be null or a whole number >= 1, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    settings = InferenceSettings.from_config(OmegaConf.to_container(cfg.inference, resolve=True))
    checkpoints = expand_checkpoints(_as_list(cfg.ckpt))  # an ensemble.yaml (crossval) lists its folds
    predictor = Predictor.from_checkpoints(checkpoints, settings, device=cfg.device, precision=cfg.precision,
                                           tf32=cfg.tf32, channels_last=cfg.channels_last,
                                           limits=InputLimits.from_config(cfg.limits),
                                           engine_cache=cfg.get("engine_cache"), num_threads=threads,
                                           progress=cfg.progress)
    splits = _as_list(cfg.get("input_splits")) or None
    cases, problems = find_cases(_as_list(cfg.input), splits)
    log.info("%d case(s) to predict with %d network(s) on %s (%s), preset %s (overlap %g, mirror axes %s%s)",
             len(cases), len(checkpoints), predictor.device, predictor.describe_engine(), settings.name,
             settings.overlap,
             list(settings.mirror_axes), ", coarse-to-fine" if settings.coarse_to_fine else "")
    summary = predict_cases(predictor, cases, cfg.output, problems=problems, overwrite=cfg.overwrite,
                            save_probabilities=cfg.save_probabilities,
                            postprocessing=OmegaConf.to_container(cfg.postprocessing, resolve=True),
                            progress=cfg.progress, prefetch=cfg.prefetch,
                            run_info={"checkpoints": checkpoints, "inference": settings.name})
    if cfg.get("wandb"):
        log_to_wandb(cfg, summary, checkpoints, settings.name)
    return summary


def log_to_wandb(cfg: DictConfig, summary: RunSummary, checkpoints: list[str], preset: str) -> None:
    """The run as a W&B run (wandb=true); a failure warns, the predictions are written already."""
    from pancreas_mtl.tracking.command_runs import log_predict_run

    config = {"input": _as_list(cfg.input), "input_splits": _as_list(cfg.get("input_splits")),
              "output": str(cfg.output), "inference": preset, "device": str(cfg.device),
              "precision": str(cfg.precision)}
    try:
        folder = log_predict_run(cfg.output, summary, project=cfg.wandb_project, checkpoints=checkpoints,
                                 config=config)
        log.info("W&B run (job_type predict) in %s", folder)
    except Exception as error:  # noqa: BLE001 - a dashboard never fails a prediction run
        log.warning("W&B: could not log the prediction run (%s: %s)", type(error).__name__, error)


@hydra.main(version_base="1.3", config_path="pkg://pancreas_mtl.conf", config_name="predict")
@one_line_refusals  # a refused file or key: "error: ..." and exit 1 (2 for usage), not a traceback
def main(cfg: DictConfig) -> None:
    summary = predict(cfg)
    if summary.exit_code:
        sys.exit(summary.exit_code)


if __name__ == "__main__":
    main()
