"""Choosing the final model honestly: an inner validation split carved from the training cases chooses the
checkpoint (select/*), the reported validation split chooses nothing, and an exponential moving average of
the weights (callbacks=ema) is what validation scores and every checkpoint holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.inference.checkpoint import load_network
from tests.test_module import CONF, NO_AUGMENTATION, cpu_trainer, make_module, tiny_dataset  # noqa: F401


@pytest.fixture(scope="module")
def with_inner(tiny_dataset):  # noqa: F811
    """The tiny set with 3 of its 12 training cases as the inner validation split."""
    from pancreas_mtl.raw.splits import carve_inner

    prepared, data_cfg = tiny_dataset
    split = carve_inner(prepared.split, prepared.index.labelled, 3, seed=0)
    return dataclasses.replace(prepared, split=split), {**data_cfg, "inner_validation": {"cases": 3, "seed": 0}}


def test_the_inner_split_chooses_the_checkpoint_and_is_never_trained_on(tiny_dataset, with_inner, tmp_path):  # noqa: F811
    prepared, data_cfg = with_inner
    inner = set(prepared.split.inner)
    assert len(inner) == 3 and not inner & set(prepared.split.train) and not inner & set(prepared.split.val)
    datamodule = PancreasDataModule(prepared, data_cfg, NO_AUGMENTATION, seed=0)
    datamodule.setup("fit")
    assert not inner & {case.case_id for case in datamodule._sampler.cases}
    assert sum(datamodule.subtype_counts().values()) == 9

    callbacks_cfg = OmegaConf.load(CONF / "callbacks/default.yaml")
    callbacks_cfg.model_checkpoint.dirpath = str(tmp_path / "checkpoints")
    checkpoint = instantiate(callbacks_cfg.model_checkpoint)
    module = make_module(tiny_dataset)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = cpu_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[checkpoint], enable_checkpointing=True,
                          check_val_every_n_epoch=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule)

    metrics = trainer.callback_metrics
    assert float(metrics["select/combined"]) == pytest.approx(float(metrics["inner/combined"]))
    assert {"inner/whole_pancreas_dice", "inner/macro_f1", "val/combined", "val/macro_f1"} <= set(metrics)
    # the reported split's scores come from its own 6 cases only
    assert sorted(c["case_id"] for c in module.last_validation["cases"]) == sorted(prepared.split.val)
    assert module.last_validation["inner_metrics"]["combined"] == pytest.approx(float(metrics["inner/combined"]))
    assert checkpoint.monitor == "select/combined"
    assert checkpoint.best_model_score == pytest.approx(float(metrics["inner/combined"]))


def test_without_an_inner_split_the_validation_split_selects(tiny_dataset, tmp_path):  # noqa: F811
    prepared, data_cfg = tiny_dataset
    assert prepared.split.inner == []
    module = make_module(tiny_dataset)
    trainer = cpu_trainer(tmp_path, max_epochs=1, check_val_every_n_epoch=1)
    trainer.fit(module, datamodule=PancreasDataModule(prepared, data_cfg, NO_AUGMENTATION, seed=0))
    metrics = trainer.callback_metrics
    assert float(metrics["select/combined"]) == pytest.approx(float(metrics["val/combined"]))
    assert not any(name.startswith("inner/") for name in metrics)


def test_ema_weights_are_validated_saved_and_resumed(tiny_dataset, tmp_path):  # noqa: F811
    prepared, data_cfg = tiny_dataset
    ema_cfg = OmegaConf.load(CONF / "callbacks/ema.yaml").weight_averaging
    assert ema_cfg._target_ == "lightning.pytorch.callbacks.EMAWeightAveraging"
    last_cfg = OmegaConf.load(CONF / "callbacks/default.yaml").last_checkpoint
    module = make_module(tiny_dataset)
    trainer = cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=True,
                          callbacks=[instantiate(ema_cfg, decay=0.5),
                                     instantiate(last_cfg, dirpath=str(tmp_path / "checkpoints"))])
    trainer.fit(module, datamodule=PancreasDataModule(prepared, data_cfg, NO_AUGMENTATION, seed=0))
    path = tmp_path / "checkpoints" / "last.ckpt"   # written at the end of the last epoch, during training

    saved = torch.load(path, map_location="cpu", weights_only=True)
    key = "model.backbone.stem.conv.weight"
    averaged, current = saved["state_dict"][key], saved["current_model_state"][key]
    assert not torch.equal(averaged, current)
    # after training the module holds the average (on_train_end), and prediction loads the average
    torch.testing.assert_close(module.state_dict()[key], averaged)
    network, _, _ = load_network(path)
    torch.testing.assert_close(network.state_dict()[key[len("model."):]], averaged)

    # resuming continues from the raw weights, with the average restored beside them
    resumed = make_module(tiny_dataset, seed=1)
    callback = EMAWeightAveraging(decay=0.5)
    trainer = cpu_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[callback])
    trainer.fit(resumed, datamodule=PancreasDataModule(prepared, data_cfg, NO_AUGMENTATION, seed=0),
                ckpt_path=str(path))
    assert trainer.global_step == 5
    # one more update of decay 0.5: the new average lies between the saved average and the new weights
    final = resumed.state_dict()[key]
    assert not torch.equal(final, averaged)
