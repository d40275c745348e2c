"""Figures a training run leaves in its folder: the learning curves (``learning_curves.png`` beside the CSV
log's ``metrics.csv``), drawn when fitting ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from pancreas_mtl.evaluation.runs import METRICS_FILE, write_learning_curves

log = logging.getLogger(__name__)


class LearningCurvesPlot(L.Callback):
    """At the end of ``fit`` (on rank 0), the epoch-level learning curves of every CSV logger's
    ``metrics.csv`` as ``filename`` beside it. A run without a CSV logger is left as it is; a failure to
    draw is a warning, never the end of the run (its checkpoints and logs are what matter).

    Args:
        filename: the PNG's name in the CSV logger's ``version_N/`` folder.
    """

    def __init__(self, filename: str):
        self.filename = filename
        self.written: list[Path] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            try:
                logger.save()  # flush the rows not yet written (they are written every log_every_n_steps)
                metrics = Path(logger.log_dir) / METRICS_FILE
                if metrics.is_file():
                    self.written.append(write_learning_curves(metrics, metrics.with_name(self.filename)))
            except Exception as error:  # noqa: BLE001 - a figure is never a reason to fail a finished run
                log.warning("could not draw the learning curves of %s (%s: %s); the CSV log is complete",
                            logger.log_dir, type(error).__name__, error)
