"""Hydra multirun: a grid sweep launches one run per setting; every Optuna search space composes."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

BASE = ["experiment=cpu_demo", "data.synthetic.size=tiny", "debug=fdr", "logger=csv",
        "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


def run_train(tmp_path, *overrides):
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-m", *BASE, f"paths.output_root={tmp_path}", *overrides]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_grid_sweep_runs_every_combination(tmp_path):
    run_train(tmp_path, "model/head=single_stage,multistage", "seed=1,2")
    sweep_dirs = list((tmp_path / "runs" / "debug" / "multirun").iterdir())
    assert len(sweep_dirs) == 1
    jobs = sorted(p for p in sweep_dirs[0].iterdir() if p.is_dir())
    assert len(jobs) == 4
    heads = set()
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        heads.add((config["model"]["head"]["_target_"].rsplit(".", 1)[1], config["seed"]))
        assert (job / "plan.json").is_file()
    assert heads == {("SingleStageHead", 1), ("SingleStageHead", 2), ("MultiStageHead", 1), ("MultiStageHead", 2)}


@pytest.mark.parametrize("search", sorted(p.stem for p in (REPO_ROOT / "conf" / "hparams_search").glob("*.yaml")))
def test_every_search_space_composes_with_tune(search):
    """An Optuna search is tune.py's (tests/test_tune.py); here every search space file still composes,
    each searched key and option included, so none rots unnoticed."""
    pytest.importorskip("optuna")
    from pancreas_mtl.training import tune

    overrides = [f"hparams_search={search}", "experiment=cpu_demo"]
    params = tune.check_search_space(tune.compose_tune(overrides), overrides)
    assert params
