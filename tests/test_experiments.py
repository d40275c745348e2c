"""Every experiment file runs: composed with Hydra and trained with fast_dev_run on the tiny synthetic set."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import REPO_ROOT

EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def compose_train(output_root: Path, output_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data.synthetic.size=tiny", "planning=small", "planning.spacing_scale=2", "data.num_workers=0",
            "data.preprocessing_workers=0", "data.progress=false", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "logger=csv", f"paths.root_dir={REPO_ROOT}",
            f"paths.output_root={output_root}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]  # as under @hydra.main, the run config does not carry Hydra's own node
    return cfg


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # data and cache shared by the tests of this module


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_with_fast_dev_run(experiment, output_root, tmp_path):
    from pancreas_mtl.training.train import train

    cfg = compose_train(output_root, tmp_path / "run", [f"experiment={experiment}", "debug=fdr"])
    train(cfg)
    assert (tmp_path / "run" / "plan.json").is_file() and (tmp_path / "run" / "run_info.json").is_file()


def test_experiment_list_is_complete():
    assert {"panda_multistage", "single_stage", "seg_only", "ovr", "lesion_attention", "cpu_demo"} <= set(EXPERIMENTS)


@pytest.mark.slow
def test_short_training_writes_checkpoints_with_plan(output_root, tmp_path):
    from pancreas_mtl.training.train import train

    cfg = compose_train(output_root, tmp_path / "run", [
        "experiment=cpu_demo", "trainer.max_epochs=1", "data.iterations_per_epoch=2",
        "trainer.check_val_every_n_epoch=1", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"])
    metric = train(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["pancreas_mtl"]["plan"]["preset"] == "small"
    assert saved["pancreas_mtl"]["config"]["model"]["head"]["_target_"].endswith("MultiStageHead")
    assert (tmp_path / "run" / "csv").is_dir()
