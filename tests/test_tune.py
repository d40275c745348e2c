"""tune.py: Optuna studies over train.py runs that survive killed workers, shared by parallel workers."""

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.conftest import REPO_ROOT

optuna = pytest.importorskip("optuna")
from pancreas_mtl.commands.tune import main as run_tune  # (after the skip: tune needs optuna)
from pancreas_mtl.training import tune
from pancreas_mtl.training.train import best_metric

TINY = ["experiment=cpu_demo", "data.synthetic.size=tiny", "planning=small", "planning.spacing_scale=2",
        "data.num_workers=0", "data.preprocessing_workers=0", "data.progress=false", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "logger=csv", "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null", "trainer.max_epochs=2", "data.iterations_per_epoch=2",
        "trainer.check_val_every_n_epoch=1", f"paths.root_dir={REPO_ROOT}"]


def study_overrides(root, *extra):
    return [*TINY, f"paths.output_root={root}", "tune.study_name=tiny", "tune.heartbeat_interval=1",
            "tune.grace_period=2", *extra]


def load(root):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{root}/studies/tiny.db")


def validation_values(run_dir):
    rows = [row for path in (run_dir / "csv").rglob("metrics.csv") for row in csv.DictReader(path.open())]
    return [float(row["select/combined"]) for row in rows if row.get("select/combined")]


def test_help_prints_the_study_config(capsys):
    assert run_tune(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hparams_search=optuna" in out and "n_trials:" in out and "storage:" in out


@pytest.mark.parametrize("override, message", [
    ("tune.storage=/tmp/study.db", "is not a database URL"),
    ("tune.storage=nosuchdb://host/x", "cannot open the study database"),
    ("~tune.params", "tune.params is empty"),
    ("+tune.params.lr={type:float,low:1}", "expected {type: float|int, low, high}"),
    ("+tune.params.no_such_key={type:categorical,choices:[1]}", "does not compose"),
    ("trainer=ddp", "a trial trains on one device"),
    ("no_such_key=1", "Could not override 'no_such_key'"),
    ("tune.direction=minimize", "but callbacks.model_checkpoint keeps the max of select/combined"),
    ("loss.cls_weight=0.3", "is searched (tune.params) and also set on the command line"),
])
def test_bad_study_settings_are_refused_by_name(tmp_path, capsys, override, message):
    assert run_tune(study_overrides(tmp_path, override)) == 2
    assert message in capsys.readouterr().err


def test_a_search_space_that_changes_the_combined_score_is_refused(tmp_path):
    """Trials are ranked by their own select/combined: a searched value that changes its weights
    (module.combined_metric; seg_only weighs the two Dice only) would rank trials on different scores."""
    overrides = [o for o in study_overrides(tmp_path) if not o.startswith("experiment=")]
    overrides.append("+tune.params.experiment={type:categorical,choices:[cpu_demo,seg_only]}")
    cfg = tune.compose_tune(overrides)
    with pytest.raises(tune.TuneError, match="tune.params.experiment=seg_only changes module.combined_metric"):
        tune.check_search_space(cfg, overrides)
    kept = [*overrides[:-1], "+tune.params.experiment={type:categorical,choices:[cpu_demo]}"]
    assert "experiment" in tune.check_search_space(tune.compose_tune(kept), kept)


def test_a_folder_of_something_else_is_refused(tmp_path, capsys):
    study_dir = tmp_path / "runs" / "tune" / "tiny"
    study_dir.mkdir(parents=True)
    (study_dir / "notes.txt").write_text("mine")
    assert run_tune(study_overrides(tmp_path)) == 2
    assert "holds 1 file(s) or folder(s) this tool did not write: notes.txt" in capsys.readouterr().err
    (study_dir / "notes.txt").unlink()
    tune.claim_study_dir(study_dir, tune.compose_tune(study_overrides(tmp_path, "tune.study_name=other")))
    assert run_tune(study_overrides(tmp_path)) == 2
    assert "holds study" in capsys.readouterr().err


def test_best_metric_is_the_checkpoint_best_not_the_last():
    checkpoint = ModelCheckpoint(monitor="val/combined", mode="max")
    checkpoint.best_model_score = torch.tensor(0.7)
    trainer = SimpleNamespace(checkpoint_callbacks=[checkpoint], callback_metrics={"val/combined": torch.tensor(0.2)})
    assert best_metric(trainer, "val/combined") == pytest.approx(0.7)
    assert best_metric(trainer, "val/other") is None
    unmonitored = SimpleNamespace(checkpoint_callbacks=[], callback_metrics={"val/combined": torch.tensor(0.2)})
    assert best_metric(unmonitored, "val/combined") == pytest.approx(0.2)


def test_trial_folder_names_number_and_params(tmp_path):
    folder = tune.trial_folder(tmp_path, 3, {"loss.cls_weight": 0.123456, "model/head": "multistage"})
    assert folder.name == "trial_0003_cls_weight=0.123,head=multistage"


@pytest.mark.slow
def test_pruner_stops_a_trial_from_its_validation_metric(tmp_path):
    # val/combined lies in [0, 1]: a threshold of 2 prunes at the first validation report (epoch 0)
    summary = tune.run_study(study_overrides(tmp_path, "tune.n_trials=1", "tune.pruner._target_=optuna.pruners."
                                             "ThresholdPruner", "~tune.pruner.n_startup_trials", "+tune.pruner.lower=2.0"))
    assert summary["pruned"] == 1 and summary["complete"] == 0
    (trial,) = load(tmp_path).get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    run_dir = next((tmp_path / "runs" / "tune" / "tiny").glob("trial_0000_*"))
    assert len(validation_values(run_dir)) == 1  # stopped before the second epoch's validation


class KillTrialOnce(Callback):
    """kill -9 of its own worker in trial 1, after epoch 1's validation and a checkpoints/last.ckpt (as
    conf/callbacks' last_checkpoint writes it), once: the retry in the same folder finds the marker."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_validation_end(self, trainer, pl_module) -> None:
        run_dir = Path(trainer.default_root_dir)
        if trainer.sanity_checking or trainer.current_epoch < 1 or not run_dir.name.startswith("trial_0001_"):
            return
        if not self.marker.exists():
            trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def start_worker(root, log_name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_switch = f"+callbacks.kill_trial_once={{_target_:tests.test_tune.KillTrialOnce,marker:'{root}/killed'}}"
    command = [sys.executable, str(REPO_ROOT / "tune.py"), *study_overrides(root, "tune.n_trials=4", kill_switch)]
    return subprocess.Popen(command, cwd=root, env=env, stdout=open(root / log_name, "w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_workers_share_a_study_and_a_killed_worker_is_resumed(tmp_path):
    states = optuna.trial.TrialState
    study_dir = tmp_path / "runs" / "tune" / "tiny"

    # one worker, killed (kill -9) while its second trial trains
    worker = start_worker(tmp_path, "worker0.log")
    assert worker.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "worker0.log").read_text()[-3000:]
    before = {t.number: t for t in load(tmp_path).get_trials()}
    assert before[0].state == states.COMPLETE and before[1].state == states.RUNNING

    # the killed worker restarted beside a second one: the two finish the study between them
    workers = [start_worker(tmp_path, "worker1.log"), start_worker(tmp_path, "worker2.log")]
    for index, process in enumerate(workers, start=1):
        assert process.wait(timeout=300) == 0, (tmp_path / f"worker{index}.log").read_text()[-3000:]

    trials = load(tmp_path).get_trials()
    finished = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
    assert len(finished) == 4
    assert trials[0].state == states.COMPLETE and trials[0].value == before[0].value  # never run again
    assert trials[1].state == states.FAIL  # the killed trial, its heartbeat gone stale ...
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 1]  # ... queued once more
    assert retry.params == before[1].params and retry.state in (states.COMPLETE, states.PRUNED)
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4  # no finished trial repeated
    logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in (1, 2))
    assert f"trial {retry.number}: " in logs and "resuming from" in logs and "trial_0001_" in logs
    for trial in finished:  # the objective is the run's best validation metric, not its last
        if trial.state == states.COMPLETE and trial is not retry:  # (the killed attempt's log may be unflushed)
            run_dir = next(study_dir.glob(f"trial_{trial.number:04d}_*"))
            assert trial.value == pytest.approx(max(validation_values(run_dir)), abs=1e-6)


def test_a_trial_is_a_wandb_run_of_the_study_group(tmp_path):
    overrides = [o if o != "logger=csv" else "logger=wandb" for o in study_overrides(tmp_path)]
    cfg = tune.trial_config(overrides, {"loss.cls_weight": 0.5}, tmp_path / "trial_0000_cls_weight=0.5")
    assert (cfg.logger.wandb.group, cfg.logger.wandb.name, cfg.logger.wandb.job_type) == (
        "tiny", "trial_0000_cls_weight=0.5", "tune")


def checkpoint_inner_cases(run_dir):
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return saved["pancreas_mtl"]["config"]["data"]["inner_validation"]["cases"]


def test_trials_are_ranked_on_the_inner_split_and_the_best_retrains_on_every_case(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # the split's log line reaches the runs' train.log
    study_dir = tmp_path / "runs" / "tune" / "tiny"
    summary = tune.run_study(study_overrides(tmp_path, "tune.n_trials=1", "tune.retrain_best=true"))
    trial_dir = next(study_dir.glob("trial_0000_*"))
    assert checkpoint_inner_cases(trial_dir) == 0.16  # data.inner_validation.sweep_cases
    rows = [row for path in (trial_dir / "csv").rglob("metrics.csv") for row in csv.DictReader(path.open())]
    inner = [(row["select/combined"], row["inner/combined"]) for row in rows if row.get("inner/combined")]
    assert inner and all(select == score for select, score in inner)  # ranked on the inner split
    assert "9 train / 3 inner validation" in (trial_dir / "train.log").read_text()  # one of each subtype

    retrained = study_dir / "retrained_trial_0000"
    assert summary["retrained"]["trial"] == 0 and summary["retrained"]["folder"] == str(retrained)
    assert checkpoint_inner_cases(retrained) == 0
    assert "12 train / 0 inner validation" in (retrained / "train.log").read_text()
    assert (retrained / "retrained.json").is_file()
    stamp = (retrained / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = tune.run_study(study_overrides(tmp_path, "tune.n_trials=1", "tune.retrain_best=true"))
    assert again["retrained"]["trial"] == 0 and (retrained / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
