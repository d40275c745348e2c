"""The LightningModule on the tiny synthetic set: training, sliding-window validation, checkpoints and resuming,
window aggregation, lr schedules, the non-finite loss policy and the loggers, on CPU in a few seconds each."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.inference.checkpoint import load_network
from pancreas_mtl.inference.settings import InferenceSettings
from pancreas_mtl.inference.sliding_window import aggregate_window_predictions, sliding_window_predict
from pancreas_mtl.training.loggers import build_loggers
from pancreas_mtl.training.validation_media import render_overlay, write_png
from pancreas_mtl.training.module import MultiTaskModule, build_module
from pancreas_mtl.training.optim import as_factory, cosine_lr, poly_lr
from pancreas_mtl.planning.planner import load_preset
from pancreas_mtl.tracking.settings import resolve_wandb_offline, wandb_credentials_available

CONF = Path(__file__).resolve().parents[1] / "conf"
NO_AUGMENTATION = {"name": "none", **{group: {"enabled": False} for group in
                                      ("spatial", "noise_blur", "intensity", "lowres", "gamma", "mirror")}}



@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The tiny synthetic set (12 training, 6 validation cases) planned with the small preset at 2x spacing."""
    root = tmp_path_factory.mktemp("module_data")
    data_cfg = {"root": str(root / "synth"), "synthetic": {"size": "tiny", "seed": 0}, "cache_dir": str(root / "cache"),
                "num_subtypes": 3, "split": "auto", "preprocessing_workers": 0, "num_workers": 0,
                "iterations_per_epoch": 2, "batch_size": 2, "progress": False, "pin_memory": False}
    planning = load_preset("small")
    planning["spacing_scale"] = 2.0
    prepared = prepare_dataset(data_cfg, planning, progress=False)
    return prepared, data_cfg


def datamodule_for(tiny_dataset) -> PancreasDataModule:
    prepared, data_cfg = tiny_dataset
    return PancreasDataModule(prepared, data_cfg, NO_AUGMENTATION, seed=0)


def compose_module(*overrides: str) -> DictConfig:
    """The ``module`` group as train.py composes it (its validation settings: a conf/inference preset)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        module = compose("train", overrides=list(overrides)).module
    return OmegaConf.create(OmegaConf.to_container(module))


def run_config(*overrides: str, **module_overrides) -> DictConfig:
    """The groups build_module reads, from the repository's YAML files, with a narrow head; ``overrides``
    are train.py command-line overrides of the module group."""
    model = {"backbone": OmegaConf.load(CONF / "model/backbone/resenc.yaml"),
             "head": OmegaConf.load(CONF / "model/head/multistage.yaml")}
    model["head"].update({"stage_features": 8, "hidden": 16})
    # several windows per tiny case
    module = compose_module("module.validation.roi_size=[8,16,16]", *overrides)
    module = OmegaConf.merge(module, module_overrides)
    return OmegaConf.create({"num_subtypes": 3, "seed": 0, "model": model,
                             "loss": OmegaConf.load(CONF / "loss/default.yaml"),
                             "optimizer": OmegaConf.load(CONF / "optimizer/sgd_nesterov.yaml"),
                             "scheduler": OmegaConf.load(CONF / "scheduler/poly.yaml"), "module": module})


def make_module(tiny_dataset, seed: int = 0, **module_overrides) -> MultiTaskModule:
    torch.manual_seed(seed)
    prepared, _ = tiny_dataset
    datamodule = datamodule_for(tiny_dataset)
    return build_module(run_config(**module_overrides), prepared.plan, datamodule.subtype_counts())


def cpu_trainer(tmp_path: Path, **kwargs) -> Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               "gradient_clip_val": 12, "default_root_dir": str(tmp_path)}
    options.update(kwargs)
    return Trainer(**options)


# --- (1) training and validation --------------------------------------------------------------------

def test_trains_and_validates_with_sliding_windows(tiny_dataset, tmp_path):
    module = make_module(tiny_dataset)
    callbacks_cfg = OmegaConf.load(CONF / "callbacks/default.yaml")
    callbacks_cfg.model_checkpoint.dirpath = str(tmp_path / "checkpoints")
    callbacks_cfg.last_checkpoint.dirpath = str(tmp_path / "checkpoints")
    callbacks = [instantiate(callbacks_cfg[name]) for name in ("model_checkpoint", "last_checkpoint",
                                                               "learning_rate_monitor")]
    logger = CSVLogger(tmp_path, name="csv")
    trainer = cpu_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=callbacks, enable_checkpointing=True,
                          check_val_every_n_epoch=1, log_every_n_steps=1, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=datamodule_for(tiny_dataset))

    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/seg_epoch", "train/dice_epoch", "train/ce_epoch", "train/cls_epoch",
                 "val/whole_pancreas_dice", "val/lesion_dice", "val/macro_f1", "val/balanced_accuracy", "val/macro_auroc",
                 "val/auroc_0", "val/auroc_1", "val/auroc_2", "val/combined"):
        assert name in metrics, name
    for name in ("val/whole_pancreas_dice", "val/lesion_dice", "val/macro_f1", "val/balanced_accuracy"):
        assert 0.0 <= float(metrics[name]) <= 1.0
    expected = (metrics["val/whole_pancreas_dice"] + metrics["val/lesion_dice"] + metrics["val/macro_f1"]) / 3
    assert float(metrics["val/combined"]) == pytest.approx(float(expected), abs=1e-6)

    # every validation case scored, the subtype confusion matrix kept, overlays written as PNG
    last = module.last_validation
    assert len(last["cases"]) == 6 and last["confusion_matrix"].sum() == 6
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 2 and overlays[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # logged to CSV, and the best checkpoint named after the metric
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert {"val/combined", "val/auroc_2", "train/loss_step", "train/cls_epoch", "lr"} <= set(header.split(","))
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("epoch0000-select") for n in names)


def test_segmentation_only_validation(tiny_dataset, tmp_path):
    """Without a head there are no subtype metrics, and val/combined is the mean of the two Dice scores."""
    prepared, _ = tiny_dataset
    cfg = run_config()
    cfg.model.head = {"_target_": None}
    cfg.loss = OmegaConf.merge(cfg.loss, {"cls_weight": 0.0, "cls_loss": None})
    module = build_module(cfg, prepared.plan, None)
    trainer = cpu_trainer(tmp_path, limit_val_batches=2)
    (metrics,) = trainer.validate(module, datamodule=datamodule_for(tiny_dataset), verbose=False)
    assert "val/macro_f1" not in metrics and module.last_validation["confusion_matrix"] is None
    assert metrics["val/combined"] == pytest.approx((metrics["val/whole_pancreas_dice"] + metrics["val/lesion_dice"]) / 2)


def test_validation_settings_are_an_inference_preset(tiny_dataset, tmp_path):
    """By default validation runs the ``validation`` preset (what it always ran: step 0.5, no mirroring);
    any other preset can be chosen as on train.py's command line, coarse-to-fine included."""
    default = make_module(tiny_dataset).validation
    assert default == InferenceSettings.from_config({"name": "validation", "mirror_axes": [], "roi_size": [8, 16, 16],
                                                      "engine": "torch"})
    assert (default.overlap, default.mirror_axes, default.sigma_scale, default.sw_batch_size,
            default.min_lesion_volume, default.coarse_to_fine) == (0.5, (), 0.125, 2, 0.5, False)

    prepared, _ = tiny_dataset
    torch.manual_seed(0)
    cfg = run_config("inference@module.validation=fastest", "module.validation.overlap=0.5")
    module = build_module(cfg, prepared.plan, datamodule_for(tiny_dataset).subtype_counts())
    assert module.validation.name == "fastest" and module.validation.coarse_to_fine
    assert module.validation.overlap == 0.5 and module.validation.roi_size == (8, 16, 16)
    assert module.hparams.validation["name"] == "fastest"  # saved with the checkpoint's hyperparameters
    (metrics,) = cpu_trainer(tmp_path, limit_val_batches=2).validate(module, datamodule=datamodule_for(tiny_dataset),
                                                                   verbose=False)
    assert len(module.last_validation["cases"]) == 2 and 0.0 <= metrics["val/whole_pancreas_dice"] <= 1.0
    with pytest.raises(ValueError, match=r"unknown inference setting\(s\) \['overlapp'\]"):
        make_module(tiny_dataset, validation={"overlapp": 0.5})


def test_channels_last_and_compile_keep_checkpoint_keys(tiny_dataset, tmp_path):
    module = make_module(tiny_dataset, channels_last=True, compile=True, compile_kwargs={"backend": "eager"})
    keys = set(module.state_dict())
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule_for(tiny_dataset))
    assert set(module.state_dict()) == keys and trainer.global_step == 2
    assert module.model.backbone.stem.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert "val/combined" in trainer.callback_metrics


# --- (2) checkpoints and resuming -------------------------------------------------------------------

class RecordTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.model_state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.lr_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_checkpoint_holds_plan_and_config_and_resumes(tiny_dataset, tmp_path):
    prepared, _ = tiny_dataset
    module = make_module(tiny_dataset)
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule_for(tiny_dataset))
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["pancreas_mtl"]
    assert saved["plan"] == prepared.plan.to_dict()
    assert saved["config"]["optimizer"]["lr"] == 0.01 and saved["config"]["model"]["head"]["hidden"] == 16
    assert "model" not in checkpoint["hyper_parameters"] and checkpoint["global_step"] == 2
    network, plan, config = load_network(path)
    assert plan == prepared.plan and config == saved["config"]
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(network.state_dict()[key], value)

    resumed = make_module(tiny_dataset, seed=1)   # other initial weights: all must come from the checkpoint
    record = RecordTrainStart()
    trainer = cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[record])
    trainer.fit(resumed, datamodule=datamodule_for(tiny_dataset), ckpt_path=str(path))
    assert record.global_step == 2 and record.lr_step == 2 and trainer.global_step == 4
    saved_optimizer = checkpoint["optimizer_states"][0]
    assert record.optimizer_state["param_groups"][0]["lr"] == pytest.approx(saved_optimizer["param_groups"][0]["lr"])
    assert set(record.optimizer_state["state"]) == set(saved_optimizer["state"]) and saved_optimizer["state"]
    for index, state in saved_optimizer["state"].items():
        torch.testing.assert_close(record.optimizer_state["state"][index]["momentum_buffer"], state["momentum_buffer"])
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model."):
            torch.testing.assert_close(record.model_state[key[len("model."):]], value)


# --- (3) classification over sliding windows --------------------------------------------------------

def test_window_aggregation_weights_by_lesion_volume():
    probabilities = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]])
    pooled = aggregate_window_predictions(probabilities, torch.tensor([3.0, 1.0, 0.0]))
    torch.testing.assert_close(pooled, torch.tensor([0.75, 0.25, 0.0]))
    pooled = aggregate_window_predictions(probabilities, torch.tensor([0.0, 2.0, 6.0]))
    torch.testing.assert_close(pooled, torch.tensor([0.15, 0.4, 0.45]))
    # no lesion predicted anywhere: every window counts the same
    uniform = aggregate_window_predictions(probabilities, torch.zeros(3))
    torch.testing.assert_close(uniform, probabilities.mean(0))
    assert float(aggregate_window_predictions(probabilities, torch.tensor([0.1, 0.1, 0.1])).sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate_window_predictions(probabilities, torch.ones(2))


def test_sliding_window_predict_matches_one_forward_pass(tiny_dataset):
    module = make_module(tiny_dataset)
    model = module.model.eval()
    no_mirroring = InferenceSettings.from_config({"mirror_axes": []})
    image = torch.randn(1, 1, 8, 16, 16)
    logits, probabilities = sliding_window_predict(model, image, (8, 16, 16), no_mirroring)
    with torch.no_grad():
        full_resolution = model.backbone(image, deep_supervision=False).seg_logits[0]
        torch.testing.assert_close(logits, full_resolution, atol=1e-4, rtol=1e-4)
        _, class_logits = model(image)
        torch.testing.assert_close(probabilities, model.class_probabilities(class_logits)[0], atol=1e-5, rtol=1e-5)
    # a case larger than the window, with mirroring: shapes and a probability vector
    mirrored = InferenceSettings.from_config({"mirror_axes": [2]})
    case = torch.randn(1, 1, 11, 21, 30)
    logits, probabilities = sliding_window_predict(model, case, (8, 16, 16), mirrored)
    assert logits.shape == (1, 3, 11, 21, 30) and probabilities.shape == (3,)
    assert float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
    # validation predicts a case as these windows do, with its own settings
    prediction = module.predict_case(case)
    logits, probabilities = sliding_window_predict(model, case, (8, 16, 16), module.validation)
    torch.testing.assert_close(prediction.probabilities, logits[0].softmax(dim=0))
    torch.testing.assert_close(prediction.subtype_probabilities, probabilities)


# --- (4) learning-rate schedules --------------------------------------------------------------------

def lr_trace(scheduler_fn, steps: int, lr: float = 0.01, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_fn(optimizer, total_steps=steps, **kwargs)
    trace = []
    for _ in range(steps + 1):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_poly_schedule_follows_nnunet():
    trace = lr_trace(poly_lr, 100, exponent=0.9, warmup_steps=0)
    assert trace[0] == pytest.approx(0.01)
    assert trace[50] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert trace[75] == pytest.approx(0.01 * 0.25 ** 0.9)
    assert trace[100] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="finite"):
        lr_trace(poly_lr, 0, exponent=0.9, warmup_steps=0)
    with pytest.raises(ValueError, match="finite"):
        poly_lr(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), total_steps=float("inf"), exponent=0.9,
                warmup_steps=0)


def test_cosine_schedule_with_warmup():
    trace = lr_trace(cosine_lr, 110, warmup_steps=10, min_lr_ratio=0.1)
    assert trace[0] == pytest.approx(0.001) and trace[4] == pytest.approx(0.005) and trace[9] == pytest.approx(0.01)
    assert trace[10] == pytest.approx(0.01)
    assert trace[60] == pytest.approx(0.001 + 0.009 * 0.5)
    assert trace[110] == pytest.approx(0.001)
    assert all(a >= b for a, b in zip(trace[10:], trace[11:]))
    # a float warm-up is a fraction of the run, and the schedule's position survives a state dict
    by_fraction = lr_trace(cosine_lr, 100, warmup_steps=0.1, min_lr_ratio=0.0)
    assert by_fraction == pytest.approx(lr_trace(cosine_lr, 100, warmup_steps=10, min_lr_ratio=0.0))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = cosine_lr(optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.0)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    restored = cosine_lr(restored_optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.0)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert as_factory(OmegaConf.load(CONF / "scheduler/none.yaml")) is None


def test_optimizer_configs_build():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = as_factory(OmegaConf.load(CONF / "optimizer/sgd_nesterov.yaml"))(params=params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    assert sgd.defaults["weight_decay"] == 3e-5 and sgd.defaults["lr"] == 0.01
    assert isinstance(as_factory(OmegaConf.load(CONF / "optimizer/adamw.yaml"))(params=params), torch.optim.AdamW)
    assert isinstance(as_factory(OmegaConf.load(CONF / "optimizer/adam.yaml"))(params=params), torch.optim.Adam)


def test_trainer_and_callback_configs_build(tmp_path):
    try:
        for name in ("default", "cpu", "gpu"):
            cfg = OmegaConf.load(CONF / f"trainer/{name}.yaml")
            if "defaults" in cfg:
                cfg = OmegaConf.merge(OmegaConf.load(CONF / "trainer/default.yaml"), cfg)
                del cfg["defaults"]
            cfg.default_root_dir = str(tmp_path)
            cfg.accelerator = "cpu"     # trainer=gpu on this machine: every other setting as given
            cfg.precision = "32-true" if name == "gpu" else cfg.precision
            trainer = instantiate(cfg, logger=False, enable_progress_bar=False)
            assert trainer.gradient_clip_val == 12
    finally:  # deterministic="warn" switches torch's global deterministic mode on
        torch.use_deterministic_algorithms(False)
    callbacks = OmegaConf.load(CONF / "callbacks/default.yaml")
    callbacks.model_checkpoint.dirpath = callbacks.last_checkpoint.dirpath = str(tmp_path)
    built = {name: instantiate(entry) for name, entry in callbacks.items()}
    assert built["model_checkpoint"].monitor == "select/combined" and built["model_checkpoint"].mode == "max"


# --- (5) non-finite loss ----------------------------------------------------------------------------

class NaNLoss(torch.nn.Module):
    """The real loss with its total made NaN."""

    def __init__(self, loss):
        super().__init__()
        self.inner = loss

    def forward(self, *args):
        terms = self.inner(*args)
        return {**terms, "loss": terms["loss"] * float("nan")}


@pytest.mark.filterwarnings("ignore:.*training_step.*returned `None`")
def test_nonfinite_loss_skip_leaves_weights(tiny_dataset, tmp_path):
    module = make_module(tiny_dataset, nonfinite_loss="skip")
    module.loss = NaNLoss(module.loss)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule_for(tiny_dataset))
    assert module.nonfinite_steps == 2
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_nonfinite_loss_stop_raises_with_case_names(tiny_dataset, tmp_path):
    module = make_module(tiny_dataset, nonfinite_loss="stop")
    module.loss = NaNLoss(module.loss)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .*quiz_"):
        trainer.fit(module, datamodule=datamodule_for(tiny_dataset))
    with pytest.raises(ValueError, match="nonfinite_loss"):
        make_module(tiny_dataset, nonfinite_loss="ignore")


# --- (6) loggers and images -------------------------------------------------------------------------

@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_build_loggers_goes_offline_without_api_key(no_wandb_credentials, monkeypatch):
    tmp_path = no_wandb_credentials
    assert not wandb_credentials_available() and resolve_wandb_offline("auto") is True
    assert resolve_wandb_offline(False) is False
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_offline("auto") is False and resolve_wandb_offline(None) is False
    monkeypatch.delenv("WANDB_API_KEY")

    cfg = OmegaConf.merge(OmegaConf.load(CONF / "logger/csv.yaml"), OmegaConf.load(CONF / "logger/wandb.yaml"))
    cfg.csv.save_dir = cfg.wandb.save_dir = str(tmp_path / "run")
    cfg.wandb.name = "test"
    config = {"seed": 0, "optimizer": {"lr": 0.01}}
    csv, wandb_logger = build_loggers(cfg, tmp_path / "run", config=config)
    assert type(csv).__name__ == "CSVLogger" and csv.experiment.hparams["optimizer"] == {"lr": 0.01}
    assert type(wandb_logger).__name__ == "WandbLogger" and wandb_logger._offline
    import wandb

    try:
        run = wandb_logger.experiment
        assert run.settings.mode in ("offline", "dryrun") and dict(run.config)["optimizer"] == {"lr": 0.01}
        wandb_logger.log_metrics({"val/combined": 0.5}, step=1)
    finally:
        wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert build_loggers(None, tmp_path) == [] and build_loggers({"none": None}, tmp_path) == []


def test_tensorboard_logger_names_the_missing_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    cfg = OmegaConf.load(CONF / "logger/tensorboard.yaml")
    cfg.tensorboard.save_dir = str(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboard"):
        build_loggers(cfg, tmp_path)


def test_overlay_and_png(tmp_path):
    from PIL import Image

    image = np.linspace(-1, 1, 20 * 30).reshape(20, 30)
    true = np.zeros((20, 30), np.uint8)
    true[5:15, 5:25] = 1
    true[8:12, 10:14] = 2
    rgb = render_overlay(image, true, np.roll(true, 2, axis=1), min_size=60)
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 180, 3)
    assert not math.isnan(float(rgb.mean()))
    path = write_png(rgb, tmp_path / "overlays" / "case.png")  # the folder is created
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in path.parent.iterdir()] == ["case.png"]
    with Image.open(path) as png:  # 8-bit RGB, the overlay's size, pixel for pixel
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", (180, 40))
        np.testing.assert_array_equal(np.asarray(png), rgb)
    with pytest.raises(ValueError, match="RGB"):
        write_png(rgb[..., 0], tmp_path / "grey.png")


def test_the_loss_takes_the_plans_lesion_label(tiny_dataset):
    prepared, _ = tiny_dataset
    swapped = dataclasses.replace(prepared.plan, labels={"background": 0, "lesion": 1, "pancreas": 2})
    module = build_module(run_config(), swapped, datamodule_for(tiny_dataset).subtype_counts())
    assert module.loss.lesion_label == 1 == module.lesion_channel


class _LastCheckpointProbe(Callback):
    """At the start of each training epoch after the first: the global step stored in last.ckpt."""

    def __init__(self, path: Path):
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self.seen.append(torch.load(self.path, weights_only=True)["global_step"] if self.path.is_file() else None)


def test_last_checkpoint_is_written_after_every_epoch_without_validation(tiny_dataset, tmp_path):
    # Lightning's ModelCheckpoint(save_top_k=0, save_last=True) wrote last.ckpt only at the end of training
    callbacks_cfg = OmegaConf.load(CONF / "callbacks/default.yaml")
    callbacks_cfg.last_checkpoint.dirpath = str(tmp_path / "checkpoints")
    probe = _LastCheckpointProbe(tmp_path / "checkpoints" / "last.ckpt")
    trainer = cpu_trainer(tmp_path, max_epochs=3, callbacks=[instantiate(callbacks_cfg.last_checkpoint), probe],
                          enable_checkpointing=True, check_val_every_n_epoch=100, num_sanity_val_steps=0)
    trainer.fit(make_module(tiny_dataset), datamodule=datamodule_for(tiny_dataset))
    assert probe.seen == [2, 4]  # two optimizer steps per epoch
