"""Training runs read back from their CSV logs (evaluation/runs.py) and the learning-curve PNG a run
writes when fitting ends (training_plots.py): curves per epoch, resumed versions, best epochs, seeds
grouped, the compare ranking, and a callback that never fails a run."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from pancreas_mtl.config import config_dir
from pancreas_mtl.evaluation import runs
from pancreas_mtl.studies.compare import ranking_table
from pancreas_mtl.training.plots import LearningCurvesPlot
from tests import notebook_inputs

PNG = b"\x89PNG\r\n\x1a\n"


def test_epoch_curves_keep_epoch_metrics_and_drop_step_columns(tmp_path):
    run = notebook_inputs.training_run(tmp_path / "run", epochs=3)
    curves = runs.epoch_curves(runs.read_run_metrics(run))
    assert "train/loss" in curves and "train/loss_step" not in curves and "val/combined" in curves
    epochs, values = curves["val/combined"]
    assert epochs.tolist() == [0, 1, 2] and np.all(np.diff(values) > 0)
    assert curves["lr-SGD"][0].tolist() == [0, 1, 2]  # the last learning rate of each epoch
    assert runs.best_epoch(curves, "val/combined") == 2 and runs.best_epoch(curves, "val/missing") is None


def test_a_resumed_version_replaces_the_rows_from_its_first_step(tmp_path):
    run = tmp_path / "run"
    first, second = CSVLogger(str(run), name="csv", version=0), CSVLogger(str(run), name="csv", version=1)
    for step, value in enumerate((1.0, 2.0, 3.0)):
        first.log_metrics({"val/combined": value, "epoch": step}, step=step)
    first.save()
    second.log_metrics({"val/combined": 9.0, "epoch": 1}, step=1)
    second.save()
    epochs, values = runs.epoch_curves(runs.read_run_metrics(run))["val/combined"]
    assert epochs.tolist() == [0, 1] and values.tolist() == [1.0, 9.0]


def test_best_epoch_of_a_distance_is_the_lowest():
    curves = {"val/lesion_hd95": (np.array([0, 1, 2]), np.array([9.0, 3.0, np.nan]))}
    assert runs.best_epoch(curves, "val/lesion_hd95") == 1


def test_runs_table_and_groups_over_seeds(tmp_path):
    sweep = notebook_inputs.multirun(tmp_path / "multirun", seeds=(1, 2, 3))
    table = runs.runs_table(sweep)
    assert table.column("run") == ["0", "1", "2", "3", "4", "5"] and set(table.column("best_epoch")) == {3}
    grouped = runs.group_runs(table)
    assert grouped.column("experiment") == ["model/head=single_stage", "model/head=multistage"]
    assert grouped.column("runs") == [3, 3]
    values = [row["val/combined"] for row in table][:3]
    assert grouped[0]["val/combined mean"] == pytest.approx(np.mean(values))
    assert grouped[0]["val/combined sd"] == pytest.approx(np.std(values, ddof=1))
    both = runs.runs_table([sweep, notebook_inputs.training_run(tmp_path / "single")])
    assert both.column("run")[-1] == "single/single" and len(both) == 7


def test_folders_that_are_not_runs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        runs.find_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run folder"):
        runs.find_runs(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a Lightning CSV log"):
        runs.read_metrics(tmp_path / "bad.csv")


def test_ranking_table_reuses_compare(tmp_path):
    sweeps = [notebook_inputs.multirun(tmp_path / name, seeds=(1,)) for name in ("a", "b")]
    for sweep, combined in zip(sweeps, (0.9, 0.6)):
        notebook_inputs.crossval_summary(sweep, tmp_path / "data", combined)
    ranking = ranking_table(sweeps, tmp_path / "compare", progress=False)
    assert ranking.column("experiment") == [str(sweeps[0]), str(sweeps[1])] and ranking.column("rank") == [1, 2]
    assert ranking.column("combined") == [0.9, 0.6]
    assert (tmp_path / "compare" / "compare.csv").is_file()
    assert (tmp_path / "compare" / "compare.md").read_text().startswith("| rank | experiment | cases | combined |")
    assert len(ranking_table([], tmp_path / "unused")) == 0 and not (tmp_path / "unused").exists()


def test_learning_curves_png_beside_the_csv(tmp_path):
    run = notebook_inputs.training_run(tmp_path / "run")
    png = runs.write_learning_curves(run / "csv" / "version_0" / "metrics.csv")
    assert png == run / "csv" / "version_0" / "learning_curves.png" and png.read_bytes()[:8] == PNG


class LoggingModel(BoringModel):
    """BoringModel logging as the LightningModule does: train/loss per step and epoch, val/combined."""

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"], on_step=True, on_epoch=True)
        return output

    def validation_step(self, batch, batch_idx):
        self.log("val/combined", torch.rand(()))


def _fit(tmp_path, callback) -> CSVLogger:
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", log_every_n_steps=50)
    trainer.fit(LoggingModel())
    return logger


def test_the_callback_draws_the_curves_when_fitting_ends(tmp_path):
    callback = LearningCurvesPlot("learning_curves.png")
    logger = _fit(tmp_path, callback)
    png = tmp_path / "csv" / "version_0" / "learning_curves.png"
    assert callback.written == [png] and png.read_bytes()[:8] == PNG and logger.log_dir == str(png.parent)
    curves = runs.epoch_curves(runs.read_metrics(png.with_name("metrics.csv")))
    assert curves["train/loss"][0].tolist() == [0, 1]  # the rows logged since the last flush were saved first


def test_a_failing_plot_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("pancreas_mtl.training.plots.write_learning_curves", broken)
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.training.plots"):
        _fit(tmp_path, LearningCurvesPlot("learning_curves.png"))
    assert "could not draw the learning curves" in caplog.text and "no fonts" in caplog.text


def test_the_default_callbacks_include_it():
    entry = OmegaConf.load(config_dir() / "callbacks" / "default.yaml")["learning_curves"]
    callback = instantiate(entry)
    assert isinstance(callback, LearningCurvesPlot) and callback.filename == "learning_curves.png"
