"""Scaling out: Hydra launchers (SLURM, submitit local, joblib), SLURM requeue and auto-resume,
preprocessing shards, and the W&B group / name / job_type of the runs of one sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from pancreas_mtl.config import config_dir
from pancreas_mtl.dataset import cache as cache_module
from pancreas_mtl.dataset.prepare import parse_shard, prepare_dataset, prepare_shard
from pancreas_mtl.training.loggers import build_loggers, wandb_run_identity
from tests.conftest import REPO_ROOT
from tests.test_prepare import data_cfg, small_planning

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="needs the cluster extra: pip install -e '.[cluster]'")


def compose_train(*overrides: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# --- launcher configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, target", [
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
])
def test_every_launcher_composes_and_instantiates(name, target):
    if name == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_train(f"hydra/launcher={name}", "hydra.sweep.dir=/tmp/sweep")
    assert cfg.hydra.launcher._target_ == target
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == target.rsplit(".", 1)[1]


def test_slurm_job_script_carries_the_cluster_values_and_the_requeue_signal(tmp_path, monkeypatch):
    """The sbatch script submitit would submit, built as the launcher builds it (a stub srun stands in
    for the cluster, which submitit looks for)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_train("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=my_lab",
                        "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {key if key in generic else f"slurm_{key}": value for key, value in launcher.params.items()
              if key not in {"submitit_folder", "max_num_timeout"}}
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"])
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--partition=gpu", "--account=my_lab", "--nodes=2", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--time=600", "--signal=USR1@120", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    assert str(tmp_path / "sweep" / ".submitit") in script


# --- SLURM environment and auto-resume ------------------------------------------------------------------

def test_ckpt_path_auto_resumes_from_the_newest_checkpoint_of_the_run_folder(tmp_path):
    from pancreas_mtl.training.train import resume_checkpoint

    assert resume_checkpoint("auto", tmp_path) is None  # a new run folder: a fresh start
    assert resume_checkpoint(None, tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_checkpoint("auto", tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's checkpoint at SLURM's requeue signal, newer
    hpc.write_bytes(b"x")
    os.utime(last, ns=(time.time_ns() - 10**9, time.time_ns() - 10**9))
    assert resume_checkpoint("auto", tmp_path) == str(hpc)
    assert resume_checkpoint("/elsewhere/epoch3.ckpt", tmp_path) == "/elsewhere/epoch3.ckpt"


def test_slurm_environment_with_requeue_only_under_slurm(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from pancreas_mtl.training.train import cluster_plugins

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    slurm_cfg = compose_train().slurm
    assert cluster_plugins(slurm_cfg) == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (environment,) = cluster_plugins(slurm_cfg)
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")  # torchrun inside an allocation: its own environment applies
    assert cluster_plugins(slurm_cfg) == []


# --- preprocessing shards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [(None, None), ("0/1", (0, 1)), ("3/4", (3, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "1/0"])
def test_parse_shard_refuses(text):
    with pytest.raises(ValueError, match="data.shard"):
        parse_shard(text)


def test_shards_fill_the_cache_that_a_full_prepare_reuses(distributed_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shards = [prepare_shard(data_cfg(distributed_dataset, cache, shard=f"{i}/2"), small_planning(), progress=False)
              for i in range(2)]
    ids = [[entry.case_id for entry in shard] for shard in shards]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 9

    def built_again(*args, **kwargs):
        raise AssertionError("a case the shards cached was preprocessed again")

    monkeypatch.setattr(cache_module, "build_entry", built_again)
    prepared = prepare_dataset(data_cfg(distributed_dataset, cache), small_planning(), progress=False)
    assert set(prepared.cases) == set(ids[0]) | set(ids[1])
    with pytest.raises(ValueError, match="data.shard"):
        prepare_dataset(data_cfg(distributed_dataset, cache, shard="0/2"), small_planning(), progress=False)


def test_a_shard_run_does_not_train(tmp_path):
    from pancreas_mtl.training.train import train

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data.shard=0/2", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="prepare_only=true"):
        train(cfg)


# --- W&B run identity -------------------------------------------------------------------------------------

def multirun_hydra_config(tmp_path, task_overrides, master_overrides=None, sweeper_params=None):
    cfg = compose_train(*task_overrides, f"hydra.sweep.dir={tmp_path / '2026-01-02_03-04-05'}").hydra
    with open_dict(cfg):
        cfg.mode = RunMode.MULTIRUN
        cfg.job.num = 1
        if sweeper_params:
            cfg.sweeper.params = sweeper_params
    if master_overrides is not None:  # what Hydra's basic sweeper writes before launching
        (tmp_path / "2026-01-02_03-04-05").mkdir()
        OmegaConf.save({"hydra": {"overrides": {"task": master_overrides}}},
                       tmp_path / "2026-01-02_03-04-05" / "multirun.yaml")
    return cfg


def test_single_run_is_named_after_its_task_without_group():
    assert wandb_run_identity(None, "cpu_demo") == {"name": "cpu_demo", "group": None}


def test_grid_job_is_named_from_its_swept_overrides_in_the_sweep_group(tmp_path):
    hydra_cfg = multirun_hydra_config(tmp_path, ["experiment=cpu_demo", "data.fold=1", "seed=2"],
                                      master_overrides=["experiment=cpu_demo", "data.fold=0,1", "seed=1,2"])
    assert wandb_run_identity(hydra_cfg, "cpu_demo") == {"name": "data.fold=1,seed=2",
                                                         "group": "cpu_demo_2026-01-02_03-04-05"}


def test_search_job_is_named_from_the_sampled_parameters(tmp_path):
    hydra_cfg = multirun_hydra_config(tmp_path, ["experiment=cpu_demo", "loss.cls_weight=0.3"],
                                      sweeper_params={"loss.cls_weight": "interval(0.05, 1.0)"})
    assert wandb_run_identity(hydra_cfg, "train")["name"] == "loss.cls_weight=0.3"


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, every folder it writes under tmp_path; build_loggers starts the run, finished after."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    yield tmp_path
    import wandb

    wandb.finish()


def test_wandb_logger_gets_group_name_and_job_type_offline(offline_wandb):
    tmp_path = offline_wandb
    hydra_cfg = multirun_hydra_config(tmp_path, ["data.fold=0"], master_overrides=["data.fold=0,1"])
    cfg = compose_train("logger=wandb", "logger.wandb.job_type=crossval", f"paths.output_dir={tmp_path / 'run'}")
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    try:
        (logger,) = build_loggers(cfg.logger, tmp_path / "run", config={"task_name": "train"})
    finally:
        HydraConfig.instance().cfg = None
    init = logger._wandb_init
    assert (init["name"], init["group"], init["job_type"], logger._offline) == (
        "data.fold=0", "train_2026-01-02_03-04-05", "crossval", True)
    assert logger.experiment.settings.mode in ("offline", "dryrun")  # started offline: no network


def test_explicit_wandb_name_and_group_are_kept(offline_wandb):
    tmp_path = offline_wandb
    cfg = compose_train("logger=wandb", "logger.wandb.name=mine", "logger.wandb.group=study",
                        f"paths.output_dir={tmp_path}")
    (logger,) = build_loggers(cfg.logger, tmp_path, config={"task_name": "train"})
    assert (logger._wandb_init["name"], logger._wandb_init["group"]) == ("mine", "study")


# --- end to end: real subprocess jobs through submitit's local executor ----------------------------------

BASE = ["experiment=cpu_demo", "data.synthetic.size=tiny", "debug=fdr", "logger=csv", "data.preprocessing_workers=0",
        "data.progress=false", "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null"]


# a short real training (fast_dev_run writes no checkpoint to cross-validate)
TRAIN = [*(o for o in BASE if o != "debug=fdr"), "data.num_workers=0", "data.persistent_workers=false",
         "trainer.max_epochs=1", "data.iterations_per_epoch=2", "trainer.check_val_every_n_epoch=1",
         "trainer.num_sanity_val_steps=0", "trainer.precision=32-true"]


def multirun(tmp_path, *overrides, base=BASE, task="debug"):
    """Run ``train.py -m hydra/launcher=local`` and return its new sweep folder."""
    sweeps = tmp_path / "runs" / task / "multirun"
    before = set(sweeps.iterdir()) if sweeps.is_dir() else set()
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=local", *base,
               f"paths.output_root={tmp_path}", *overrides]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = set(sweeps.iterdir()) - before
    return sweep


@pytest.mark.slow
def test_shards_then_two_fold_multirun_through_submitit_local(tmp_path):
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    # generated first: the jobs of a multirun start at once, and the set is generated on first use
    generate_dataset(tmp_path / "data" / "synthetic_tiny", load_config("tiny"), progress=False)

    shard_sweep = multirun(tmp_path, "prepare_only=true", "data.shard=0/2,1/2")
    entries = sorted((tmp_path / "cache").glob("*/*/*.json"))
    entries = [path for path in entries if path.name != "plan.json"]
    assert entries, "the shards cached nothing"
    written = {path: path.stat().st_mtime_ns for path in entries}
    assert len(list(shard_sweep.glob(".submitit/*/*_result.pkl"))) == 2

    sweep = multirun(tmp_path, "data.split=kfold", "data.num_folds=2", "data.fold=0,1", base=TRAIN, task="cpu_demo")
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [job.name for job in jobs] == ["0", "1"]
    for fold, job in enumerate(jobs):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert (config["data"]["split"], config["data"]["fold"]) == ("kfold", fold)
        for name in ("plan.json", "fingerprint.json", "run_info.json", "cpu_demo.log", "checkpoints/last.ckpt"):
            assert (job / name).is_file(), job / name
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # two submitit jobs, each its own process
    assert {path: path.stat().st_mtime_ns for path in entries} == written  # the shards' entries were reused

    # the fold set cross-validated in one command, and its ensemble predicts with predict.py
    from pancreas_mtl.commands.cli import main as cli_main
    from tests.predict_helpers import run_predict, write_cases

    assert cli_main(["crossval", f"multirun={sweep}", "device=cpu", "bootstrap=20", "plots=false",
                     "progress=false"]) == 0
    result = json.loads((sweep / "crossval" / "crossval.json").read_text())
    assert [fold["fold"] for fold in result["folds"]] == [0, 1] and result["num_cases"] > 0
    assert (sweep / "crossval" / "evaluation" / "summary.json").is_file()
    names = write_cases(tmp_path / "new_cases", count=1)
    summary = run_predict([f"ckpt={sweep / 'crossval' / 'ensemble.yaml'}", f"input={tmp_path / 'new_cases'}",
                           f"output={tmp_path / 'new_predictions'}"])
    assert summary.predicted == names and summary.exit_code == 0
