"""The W&B dashboards, read back from offline runs: the validation table, the worst cases with mask
layers, the confusion and ROC charts, the perf/* scalars, the config and model artifacts of a training
run, and the predict and evaluate runs linked to it. No test reaches the network (WANDB_MODE=offline)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pancreas_mtl.training import validation_media as logging_utils
from pancreas_mtl.training.validation_media import log_validation_cases, validation_slice
from pancreas_mtl.evaluation.selection import worst_cases
from pancreas_mtl.tracking.media import case_rows, log_validation_media
from tests.wandb_records import offline_runs

LABELS = {"background": 0, "pancreas": 1, "lesion": 2}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, every folder it writes under tmp_path, no credentials."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    yield tmp_path
    import wandb

    wandb.finish()


def validation_cases(count: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = []
    for index in range(count):
        true = np.zeros((6, 20, 24), np.uint8)
        true[1:5, 4:16, 4:20] = 1
        true[2:4, 8:12, 8:12] = 2
        pred = np.roll(true, index, axis=2)  # case 0 perfect, later ones shifted further
        image = torch.from_numpy(rng.normal(size=true.shape).astype(np.float32))
        probabilities = torch.softmax(torch.tensor(rng.normal(size=3), dtype=torch.float32), 0)
        cases.append({"case_id": f"case_{index}", "subtype": index % 3, "probabilities": probabilities,
                      "whole_pancreas_dice": 1.0 - 0.2 * index, "lesion_dice": 1.0 - 0.25 * index,
                      "slice": validation_slice(image, true, pred, lesion_label=2)})
    return cases


def test_validation_slice_keeps_the_lesion_slice_as_small_arrays():
    true = np.zeros((5, 8, 9), np.uint8)
    true[3, 2:5, 2:5] = 2
    view = validation_slice(torch.arange(5 * 8 * 9, dtype=torch.float32).reshape(5, 8, 9), true, true)
    assert view["z"] == 3 and view["image"].dtype == np.uint8 and view["image"].shape == (8, 9)
    assert view["true"].dtype == view["pred"].dtype == np.uint8 and (view["true"] == 2).sum() == 9


def test_worst_cases_and_table_rows():
    cases = validation_cases()
    assert [case["case_id"] for case in worst_cases(cases, "lesion_dice", 2)] == ["case_3", "case_2"]
    columns, rows = case_rows(cases, epoch=5)
    assert columns == ["epoch", "case", "subtype", "predicted_subtype", "p0", "p1", "p2", "whole_pancreas_dice",
                       "lesion_dice"]
    assert rows[1][:3] == [5, "case_1", 1] and rows[1][3] == int(np.argmax(rows[1][4:7]))
    assert sum(rows[0][4:7]) == pytest.approx(1.0, abs=1e-5)


def test_validation_media_in_an_offline_run(offline_wandb):
    import wandb

    run = wandb.init(project="test", dir=str(offline_wandb), mode="offline")
    log_validation_media(run, validation_cases(), step=7, epoch=1, labels=LABELS, num_worst=2)
    run.finish()
    [logged] = offline_runs(offline_wandb)
    table = logged.table("val/cases")
    assert [row[1] for row in table["data"]] == ["case_0", "case_1", "case_2", "case_3"]
    assert table["columns"][-2:] == ["whole_pancreas_dice", "lesion_dice"]
    [step] = [step for step in logged.history if "val/worst_cases" in step]
    assert step["trainer/global_step"] == 7 and step["val/worst_cases"]["count"] == 2
    # each image carries two mask layers with the plan's class names, which the UI toggles
    masks = step["val/worst_cases"]["all_masks"][0]
    assert set(masks) == {"ground_truth", "prediction"}
    assert logged.files("media/images/val/worst_cases_*.png") and logged.files("media/images/mask/**/*.mask.png")
    labels = logged.config["_wandb"]["mask/class_labels"]
    assert {"0": "background", "1": "pancreas", "2": "lesion"} in [entry["value"] for entry in labels.values()]
    assert logged.charts["val/roc"] == "wandb/area-under-curve/v0"


def test_logging_failures_warn_once_and_never_raise(caplog):
    class BrokenWandbLogger:
        @property
        def experiment(self):
            raise RuntimeError("no run")

    BrokenWandbLogger.__name__ = "WandbLogger"
    logging_utils._warned.discard("cases:WandbLogger")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            log_validation_cases([BrokenWandbLogger()], validation_cases(1), 0, 0, LABELS, 1)
    assert sum("could not log the validation cases" in r.message for r in caplog.records) == 1


class _Linear(L.LightningModule):
    """The smallest module the monitor can watch: batches {"image": (B, 4)}."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_monitor_logs_throughput_validation_time_and_gpu_memory(tmp_path, monkeypatch):
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from pancreas_mtl.training.monitoring import TrainingMonitor

    # the CUDA branch, on a machine without one: the peak-memory calls answer 3 GiB
    monkeypatch.setattr(TrainingMonitor, "_cuda", staticmethod(lambda module: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    loader = DataLoader([{"image": torch.randn(4)} for _ in range(6)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path, name="csv"),
                        callbacks=[TrainingMonitor()], log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(_Linear(), train_dataloaders=loader, val_dataloaders=loader)
    with open(next(tmp_path.rglob("metrics.csv"))) as stream:
        rows = list(csv.DictReader(stream))
    speeds = [float(row["perf/train_samples_per_s"]) for row in rows if row.get("perf/train_samples_per_s")]
    assert len(speeds) == 3 and all(speed > 0 for speed in speeds)
    [validation] = [row for row in rows if row.get("perf/validation_s")]
    assert float(validation["perf/validation_s"]) >= 0
    assert float(validation["perf/validation_gpu_peak_memory_gb"]) == 3.0
    peaks = {float(row["perf/train_gpu_peak_memory_gb"]) for row in rows if row.get("perf/train_gpu_peak_memory_gb")}
    assert peaks == {3.0}


# --- a training run, its predictions and their evaluation -------------------------------------------

def compose_train(output_root: Path, run_dir: Path, overrides: list[str]):
    """train.py's config as tests/test_experiments.py composes it, with W&B and CSV loggers."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.conftest import REPO_ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=cpu_demo", "data.synthetic.size=tiny", "data.num_workers=0", "data.preprocessing_workers=0",
            "data.progress=false", "trainer.precision=32-true", "logger=many_loggers", f"paths.root_dir={REPO_ROOT}",
            f"paths.output_root={output_root}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        del cfg["hydra"]
    return cfg


@pytest.mark.slow
def test_training_predict_and_evaluate_runs_link_up(offline_wandb):
    from pancreas_mtl.commands.cli import main
    from tests.predict_helpers import run_predict
    from pancreas_mtl.training.train import train

    tmp_path = offline_wandb
    run_dir = tmp_path / "run"
    cfg = compose_train(tmp_path / "outputs", run_dir, [
        "trainer.max_epochs=1", "data.iterations_per_epoch=2", "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null",
        "logger.wandb.log_model=true", "data.inner_validation.cases=0"])
    train(cfg)

    # --- training: config and model artifacts, the run's id in run_info.json and the checkpoint
    [trained] = offline_runs(run_dir)
    assert trained.job_type == "train"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["wandb"]["id"] == trained.id
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert checkpoint["wandb"]["id"] == trained.id and checkpoint["wandb"]["config_artifact"] == f"config-{trained.id}"
    artifacts = {(a["type"], a["name"]): a for a in trained.artifacts if a["type"] != "run_table"}
    config_artifact = artifacts[("config", f"config-{trained.id}")]
    assert {"plan.json", "config.yaml", "fingerprint.json"} <= set(config_artifact["files"])
    models = [a for a in trained.artifacts if a["type"] == "model"]
    assert {alias for a in models for alias in a["aliases"]} >= {"best", "last", "latest"}
    assert all(a["name"] == f"model-{trained.id}" and a["files"] == ["model.ckpt"] for a in models)
    # --- validation media, charts and perf scalars
    assert {"val/cases", "val/worst_cases", "val/confusion_matrix_table", "val/combined", "lr",
            "perf/train_samples_per_s", "perf/validation_s"} <= trained.history_keys
    assert len(trained.table("val/cases")["data"]) == 6
    assert trained.charts["val/roc"] == "wandb/area-under-curve/v0"
    assert trained.charts["val/confusion_matrix"] == "wandb/confusion_matrix/v1"
    assert trained.files("media/images/mask/**/*.mask.png")
    header = next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"perf/train_samples_per_s", "perf/validation_s", "lr"} <= set(header)  # every logger gets them

    # --- predict: job_type predict, in the training run's group, naming it
    data_root = Path(cfg.data.root)
    summary = run_predict([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"input={data_root}",
                           "input_splits=[validation]", f"output={tmp_path / 'pred'}", "wandb=true"])
    [predicted] = offline_runs(tmp_path / "pred")
    assert (predicted.job_type, predicted.group) == ("predict", trained.id)
    assert predicted.config["train_run_id"] == trained.id
    assert len(predicted.table("predict/cases")["data"]) == len(summary.predicted) == 6
    assert predicted.summary["predict/predicted"] == 6

    # --- evaluate: job_type evaluate, naming the predict and training runs; scores, tables, charts, plots
    out = tmp_path / "evaluation"
    assert main(["evaluate", f"pred={tmp_path / 'pred'}", f"gt={data_root}", "splits=[validation]", f"out={out}",
                 "bootstrap=20", "progress=false", "wandb=true"]) == 0
    [evaluated] = offline_runs(out)
    assert (evaluated.job_type, evaluated.group) == ("evaluate", trained.id)
    assert (evaluated.config["train_run_id"], evaluated.config["predict_run_id"]) == (trained.id, predicted.id)
    assert 0.0 <= evaluated.summary["evaluate/whole_pancreas_dice"] <= 1.0 and "evaluate/macro_f1" in evaluated.summary
    assert len(evaluated.table("evaluate/cases")["data"]) == 6
    assert evaluated.charts["evaluate/confusion_matrix"] == "wandb/confusion_matrix/v1"
    assert "evaluate/plots/dice_by_subtype" in evaluated.history_keys
    assert evaluated.files("media/images/evaluate/plots/dice_by_subtype_*.png")


@pytest.mark.slow
def test_a_resumed_training_continues_its_wandb_run(offline_wandb):
    from pancreas_mtl.training.train import train

    tmp_path = offline_wandb
    run_dir = tmp_path / "run"
    common = ["data.iterations_per_epoch=2", "trainer.check_val_every_n_epoch=1", "callbacks.rich_progress_bar=null",
              "callbacks.rich_model_summary=null", "data.inner_validation.cases=0", "ckpt_path=auto"]
    train(compose_train(tmp_path / "outputs", run_dir, ["trainer.max_epochs=1", *common]))
    [first] = offline_runs(run_dir)
    train(compose_train(tmp_path / "outputs", run_dir, ["trainer.max_epochs=2", *common]))  # resumes last.ckpt
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and {run.id for run in runs} == {first.id}  # one W&B run, written in two parts
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert checkpoint["epoch"] == 1 and checkpoint["wandb"]["id"] == first.id
