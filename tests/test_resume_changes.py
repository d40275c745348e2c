"""Resuming a run folder with changed settings: refused with the keys that differ unless
resume.allow_changes=true; every start's config kept, the first part's .hydra/config.yaml never replaced."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import REPO_ROOT
from tests.test_experiments import compose_train

# One epoch of 2 steps, no validation: a last.ckpt to resume from in seconds.
TINY_RUN = ["experiment=cpu_demo", "data.iterations_per_epoch=2", "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=100", "trainer.num_sanity_val_steps=0",
            "data.inner_validation.cases=0", "trainer.precision=32-true", "module.num_overlays=0",
            "callbacks.model_checkpoint=null", "callbacks.learning_curves=null",
            "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


def train_with_hydra(output_root: Path, run_dir: Path, *extra: str) -> None:
    """train.py's own entry point in this process, so Hydra writes the run folder's config as on the
    command line (the settings of tests.test_experiments.compose_train, plus hydra.run.dir)."""
    from pancreas_mtl.commands.train import main

    GlobalHydra.instance().clear()
    argv = ["train.py", "data.synthetic.size=tiny", "planning=small", "planning.spacing_scale=2",
            "data.num_workers=0", "data.preprocessing_workers=0", "data.progress=false",
            "trainer.accelerator=cpu", "logger=csv", f"paths.root_dir={REPO_ROOT}",
            f"paths.output_root={output_root}", f"hydra.run.dir={run_dir}", *TINY_RUN, *extra]
    saved_argv = sys.argv
    sys.argv = argv
    try:
        main()
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_changes")  # synthetic data and cache shared by the runs below


@pytest.fixture(scope="module")
def first_part(output_root):
    """A run folder after its first part: .hydra/config.yaml and checkpoints/last.ckpt (step 2)."""
    run_dir = output_root / "first_part"
    train_with_hydra(output_root, run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    return run_dir


@pytest.fixture
def run_folder(first_part, tmp_path):
    """A copy of the first part's run folder for one test to resume in."""
    return Path(shutil.copytree(first_part, tmp_path / "run"))


def test_resuming_with_another_lr_or_loss_weight_is_refused_listing_the_keys(run_folder, output_root):
    from pancreas_mtl.training.train import train

    cfg = compose_train(output_root, run_folder, [*TINY_RUN, "trainer.max_epochs=2", "optimizer.lr=0.001",
                                                  "loss.cls_weight=0.5"])
    with pytest.raises(ValueError) as refused:
        train(cfg)
    message = str(refused.value)
    assert str(run_folder / "checkpoints" / "last.ckpt") in message
    assert "optimizer.lr: 0.003 vs 0.001" in message and "loss.cls_weight: 1.0 vs 0.5" in message
    assert "resume.allow_changes=true" in message
    assert "max_epochs" not in message and "paths." not in message  # a longer run, another folder: ignored
    assert torch.load(run_folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_allow_changes_resumes_and_each_part_keeps_its_config(run_folder, output_root):
    first_config = (run_folder / ".hydra" / "config.yaml").read_bytes()
    train_with_hydra(output_root, run_folder, "trainer.max_epochs=2", "loss.cls_weight=0.5",
                     "resume.allow_changes=true")

    resumed = torch.load(run_folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["pancreas_mtl"]["config"]["loss"]["cls_weight"] == 0.5
    assert (run_folder / ".hydra" / "config.yaml").read_bytes() == first_config
    assert yaml.safe_load(first_config)["loss"]["cls_weight"] == 1.0
    second = yaml.safe_load((run_folder / ".hydra" / "resume-1" / "config.yaml").read_text())
    assert second["loss"]["cls_weight"] == 0.5 and second["trainer"]["max_epochs"] == 2
    assert "loss.cls_weight=0.5" in (run_folder / ".hydra" / "resume-1" / "overrides.yaml").read_text()


def test_a_longer_run_on_other_workers_and_folders_is_no_change(first_part):
    from pancreas_mtl.training.train import resume_changes

    stored = torch.load(first_part / "checkpoints" / "last.ckpt", weights_only=True)["pancreas_mtl"]["config"]
    ignore = stored["resume"]["ignore"]
    moved = yaml.safe_load(yaml.safe_dump(stored))
    moved["trainer"]["max_epochs"] = 100
    moved["data"]["num_workers"] = 8
    moved["paths"]["output_dir"] = "/elsewhere/run"
    moved["callbacks"]["last_checkpoint"]["dirpath"] = "/elsewhere/run/checkpoints"
    moved["logger"] = {"wandb": {"id": "abc"}}
    assert resume_changes(stored, moved, ignore) == []
    moved["augmentation"]["mirror"]["prob"] = 0.0
    moved["data"]["root"] = "/another/dataset"
    assert resume_changes(stored, moved, ignore) == [
        "augmentation.mirror.prob: 0.5 vs 0.0",
        f"data.root: {stored['data']['root']!r} vs '/another/dataset'"]
