"""Hydra multirun: a grid sweep and the Optuna search each launch one run per setting."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

BASE = ["experiment=cpu_demo", "data.synthetic.size=tiny", "debug=fdr", "logger=csv",
        "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


def run_train(tmp_path, *overrides):
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-m", *BASE, f"paths.output_root={tmp_path}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
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


@pytest.mark.slow
def test_optuna_search_reports_best_parameters(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_train(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    results = list((tmp_path / "runs" / "debug" / "multirun").glob("*/optimization_results.yaml"))
    assert len(results) == 1
    best = yaml.safe_load(results[0].read_text())
    assert set(best["best_params"]) == {"loss.cls_weight", "optimizer.lr", "model/head"}
    assert 0.0 <= best["best_value"] <= 1.0
