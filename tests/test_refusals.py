"""Refusals of train.py, predict.py and tune.py: one line naming the file or key, exit 1 (2 for usage), no
traceback and no empty run folder; values checked where they are read; a study joined only with its own
overrides."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from pancreas_mtl.commands import refusals
from pancreas_mtl.dataset.settings import data_settings
from pancreas_mtl.inference import checkpoint as checkpoint_module
from pancreas_mtl.inference.checkpoint import read_checkpoint
from pancreas_mtl.planning.plan import Plan, PlanError
from pancreas_mtl.training.validation_schedule import validation_problem
from tests.conftest import REPO_ROOT
from tests.predict_helpers import save_checkpoint, tiny_plan, write_cases

TARGET = {"_target_": "os.system", "command": "touch pwned"}


def run_entry_point(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PANCREAS_MTL_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def tampered_checkpoint(path, edit):
    save_checkpoint(path, tiny_plan())
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["pancreas_mtl"])
    torch.save(checkpoint, path)
    return path


def plan_with_target(saved):
    saved["plan"]["normalization"][0]["_target_"] = "os.system"


def untrusted_model(saved):
    saved["config"]["model"]["backbone"]["_target_"] = "subprocess.run"


# --- the entry points, as commands ------------------------------------------------------------------------

def test_predict_without_ckpt_is_a_usage_error_naming_the_key_and_leaves_no_run_folder(tmp_path):
    write_cases(tmp_path / "in", count=1)
    result = run_entry_point("predict.py", [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                                            f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    (line,) = error_lines(result)
    assert "ckpt is required" in line and "ckpt=..." in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_train_refuses_a_negative_batch_size_naming_the_key_before_writing_anything(tmp_path):
    result = run_entry_point("train.py", ["experiment=cpu_demo", "data.batch_size=-1", "logger=csv",
                                          f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "samples_per_epoch" not in result.stderr
    (line,) = error_lines(result)
    assert "data.batch_size=-1" in line and ">= 1" in line
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "outputs" / "data").exists()  # refused before the synthetic set was generated


def test_predict_multirun_reports_each_refused_checkpoint_in_one_line(tmp_path):
    """An untrusted model config, a plan field with _target_ and an ensemble.yaml with a python tag: in a
    sweep each job is refused in one line naming its file, Hydra goes on and exits 1, no traceback."""
    untrusted = tampered_checkpoint(tmp_path / "untrusted.ckpt", untrusted_model)
    plan_target = tampered_checkpoint(tmp_path / "plan_target.ckpt", plan_with_target)
    (tmp_path / "ens").mkdir()
    ensemble = tmp_path / "ens" / "ensemble.yaml"
    ensemble.write_text("checkpoints: !!python/object/apply:os.system ['touch pwned']\n")
    write_cases(tmp_path / "in", count=1)
    result = run_entry_point("predict.py", ["-m", f"ckpt={untrusted},{plan_target},{ensemble}",
                                            f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 3, result.stderr[-3000:]
    assert str(untrusted) in lines[0] and "model.backbone._target_" in lines[0]
    assert str(plan_target) in lines[1] and "normalization[0]" in lines[1] and "_target_" in lines[1]
    assert str(ensemble) in lines[2]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name != ".submitit"]


# --- the helper, in-process -------------------------------------------------------------------------------

@pytest.fixture
def no_hydra_job(monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as outside @hydra.main
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def test_refusals_print_one_line_and_bugs_keep_their_traceback(no_hydra_job, capsys, monkeypatch):
    def refuse(cfg):
        raise FileNotFoundError(f"{cfg.ckpt} not found")

    with pytest.raises(SystemExit) as exited:
        refusals.one_line_refusals(refuse)(OmegaConf.create({"ckpt": "/x.ckpt"}))
    assert exited.value.code == 1 and capsys.readouterr().err == "error: /x.ckpt not found\n"

    with pytest.raises(SystemExit) as exited:
        refusals.one_line_refusals(lambda cfg: cfg.ckpt)(OmegaConf.create({"ckpt": "???", "output": "???"}))
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: ckpt, output are required")

    def bug(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        refusals.one_line_refusals(bug)(OmegaConf.create({}))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):  # the full error asked for: Hydra prints the traceback
        refusals.one_line_refusals(refuse)(OmegaConf.create({"ckpt": "/x.ckpt"}))


def test_a_run_folder_is_removed_only_when_it_holds_nothing_but_hydras_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for name in refusals.HYDRA_FILES:
        (run / ".hydra" / name).write_text("{}")
    handler = logging.FileHandler(run / "train.log")
    logging.getLogger().addHandler(handler)
    hydra_cfg = OmegaConf.create({"runtime": {"output_dir": str(run)}, "mode": None, "job": {"num": 0}})
    monkeypatch.setattr(refusals, "_hydra_config", lambda: hydra_cfg)
    try:
        (run / "run_info.json").write_text("{}")  # the run's own file: kept
        assert refusals.remove_untouched_run_folder() is None and run.is_dir()
        (run / "run_info.json").unlink()
        (run / ".hydra" / "notes.txt").write_text("mine")
        assert refusals.remove_untouched_run_folder() is None and run.is_dir()
        (run / ".hydra" / "notes.txt").unlink()
        assert refusals.remove_untouched_run_folder() == run and not run.exists()
        assert handler not in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# --- values checked where they are read -------------------------------------------------------------------

@pytest.mark.parametrize("where, edit", [
    ("normalization[0]", lambda plan: plan["normalization"][0].update(TARGET)),
    ("batch_size", lambda plan: plan.update(batch_size=dict(TARGET))),
    ("patch_size", lambda plan: plan.update(patch_size=dict(TARGET))),
    ("strides[1]", lambda plan: plan["strides"].__setitem__(1, dict(TARGET))),
    ("labels.lesion", lambda plan: plan["labels"].update(lesion=dict(TARGET))),
])
def test_a_plan_field_that_is_not_a_plain_value_is_refused_naming_the_file_and_field(where, edit):
    stored = tiny_plan().to_dict()
    edit(stored)
    with pytest.raises(PlanError) as raised:
        Plan.from_dict(stored, source="/models/fold0/plan.json")
    assert str(raised.value).startswith(f"/models/fold0/plan.json: plan field {where}")
    assert "_target_" in str(raised.value)
    assert Plan.from_dict(tiny_plan().to_dict()) == tiny_plan()


def test_callers_that_know_the_plan_file_name_it(tmp_path, monkeypatch):
    path = tampered_checkpoint(tmp_path / "c.ckpt", plan_with_target)
    with pytest.raises(PlanError, match=rf"{path} \(its stored plan\): plan field normalization\[0\]: "):
        read_checkpoint(path)

    def read_model_folder(folder):
        stored = tiny_plan().to_dict()
        stored["normalization"][0].update(TARGET)
        return Plan.from_dict(stored)

    monkeypatch.setattr(checkpoint_module, "is_model_folder", lambda path: True)
    monkeypatch.setattr(checkpoint_module, "read_model_folder", read_model_folder)
    with pytest.raises(PlanError, match=rf"{tmp_path / 'model' / 'plan.json'}: plan field normalization\[0\]"):
        checkpoint_module.load_predictable(tmp_path / "model")


@pytest.mark.parametrize("key, value", [("batch_size", -1), ("batch_size", 0), ("iterations_per_epoch", 0),
                                        ("num_workers", -2), ("prefetch_factor", 0)])
def test_data_counts_are_checked_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}={value} \(.*\): expected a whole number >= "):
        data_settings({"root": "/data", "cache_dir": "/cache", key: value})
    assert data_settings({"root": "/data", "cache_dir": "/cache", "batch_size": None}).batch_size is None


@pytest.mark.parametrize("trainer, iterations, problem", [
    ({"max_epochs": 1000, "max_steps": 2, "check_val_every_n_epoch": 1}, 4,
     "trainer.max_steps=2 ends training after step 2, and the first validation comes after step 4"),
    ({"max_epochs": 2, "max_steps": -1, "check_val_every_n_epoch": 5}, 4, "raise trainer.max_epochs to at least 5"),
    ({"max_epochs": 1000, "max_steps": 4, "check_val_every_n_epoch": 1}, 4, None),
    ({"max_epochs": 1000, "max_steps": 3, "check_val_every_n_epoch": 1, "val_check_interval": 0.5}, 4, None),
    ({"max_epochs": 1000, "max_steps": 7, "check_val_every_n_epoch": None, "val_check_interval": 8}, 4,
     "raise trainer.max_steps to at least 8, or lower trainer.val_check_interval"),
    ({"max_epochs": 1000, "max_steps": 2, "check_val_every_n_epoch": 1, "limit_val_batches": 0}, 4, None),
    ({"max_epochs": 1000, "max_steps": 2, "fast_dev_run": True}, 4, None),
])
def test_a_validation_that_can_never_run_is_found_from_the_settings(trainer, iterations, problem):
    found = validation_problem(trainer, iterations)
    assert found == problem if problem is None else problem in found


def compose_train(tmp_path, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={REPO_ROOT}", f"paths.output_root={tmp_path}",
                                          *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_train_reports_a_validation_that_never_runs_at_the_start(tmp_path, caplog):
    from pancreas_mtl.training.train import check_settings

    cfg = compose_train(tmp_path, ["experiment=cpu_demo", "trainer.max_steps=2", "data.iterations_per_epoch=4"])
    with caplog.at_level(logging.WARNING, logger="train"):
        check_settings(cfg)
    assert "no validation would run: trainer.max_steps=2" in caplog.text
    assert "no select/combined" in caplog.text
    with pytest.raises(ValueError, match="raise trainer.max_steps to at least 20"):
        check_settings(cfg, need_validation=True)  # cpu_demo validates every 5th epoch of 4 steps


# --- tune.py ----------------------------------------------------------------------------------------------

@pytest.fixture
def tune_module():
    pytest.importorskip("optuna")
    from pancreas_mtl.training import tune

    return tune


def run_tune(overrides):
    from pancreas_mtl.commands.tune import main

    return main(overrides)


def study_overrides(root, *extra):
    from tests.test_tune import study_overrides as tiny_study

    return tiny_study(root, *extra)


def test_tune_refuses_settings_no_trial_can_validate_with_before_any_trial(tune_module, tmp_path, capsys):
    assert run_tune(study_overrides(tmp_path, "trainer.max_steps=1")) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "trainer.max_steps=1 ends training after step 1" in line
    assert not (tmp_path / "runs" / "tune" / "tiny").exists()

    # a search space whose extremes no trial could train with
    cfg = tune_module.compose_tune(study_overrides(tmp_path))
    with open_dict(cfg):
        cfg.tune.params = {"data.batch_size": {"type": "int", "low": 0, "high": 2}}
    with pytest.raises(tune_module.TuneError, match=r"tune\.params\.data\.batch_size=0: data\.batch_size=0 "
                                                    r"\(patches per training step"):
        tune_module.check_search_space(cfg, study_overrides(tmp_path))


def test_tune_checks_each_trials_settings_before_training_it(tune_module, tmp_path, monkeypatch):
    run_dir = tmp_path / "trial_0000"
    with pytest.raises(ValueError, match="no validation would run: trainer.max_epochs=1"):
        tune_module.trial_config(study_overrides(tmp_path), {"trainer.check_val_every_n_epoch": 2,
                                                              "trainer.max_epochs": 1}, run_dir)
    assert not run_dir.exists()

    # a sampled combination refused: the trial fails untrained and the worker stops, naming it
    monkeypatch.setattr(tune_module, "suggest", lambda trial, params: {"trainer.check_val_every_n_epoch": 3})
    with pytest.raises(tune_module.TuneError, match=r"trial 0 .*trainer.max_epochs=2 ends training"):
        tune_module.run_study(study_overrides(tmp_path))
    import optuna

    (trial,) = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/studies/tiny.db").get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and "no validation would run" in trial.user_attrs["refused"]
    assert not list((tmp_path / "runs" / "tune" / "tiny").glob("trial_*"))


def test_tune_refuses_to_join_a_study_with_other_fixed_overrides(tune_module, tmp_path, capsys):
    no_trials = "tune.max_trials_per_worker=0"  # a worker that only creates or joins the study
    assert run_tune(study_overrides(tmp_path, no_trials, "seed=1")) == 0
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/studies/tiny.db")
    assert study.user_attrs["fixed_overrides"]["seed"] == "seed=1"
    assert "tune.max_trials_per_worker" not in study.user_attrs["fixed_overrides"]
    capsys.readouterr()

    # the same fixed overrides, another worker share: joins
    assert run_tune(study_overrides(tmp_path, "tune.max_trials_per_worker=0", "seed=1")) == 0
    assert run_tune(study_overrides(tmp_path, no_trials, "seed=2", "trainer.max_epochs=3")) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "was created with other overrides" in line
    assert "seed=1 (study) vs seed=2 (this worker)" in line
    assert "trainer.max_epochs=2 (study) vs trainer.max_epochs=3 (this worker)" in line
