"""The inner validation split: off for a single run (every training case trains), on where a sweep ranks
runs by select/* (Hydra multiruns over settings, not over folds or seeds), the same on every DDP rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pancreas_mtl.training import inner_validation, train as train_module
from tests.conftest import REPO_ROOT, write_distributed_dataset


def run_config(cases=None, metric="select/combined"):
    return OmegaConf.create({"optimized_metric": metric, "data": {"inner_validation": {
        "cases": cases, "sweep_cases": 0.16, "replicate_keys": ["data.fold", "seed"], "seed": 1}}})


def hydra_node(tmp_path: Path, mode: str, sweep: list[str]) -> dict:
    """The parts of a Hydra config that multirun_ranking reads, with the sweep's multirun.yaml written."""
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep}}}), tmp_path / "multirun.yaml")
    return {"mode": f"RunMode.{mode}", "sweep": {"dir": str(tmp_path)}}


@pytest.mark.parametrize("mode, sweep, metric, ranked", [
    ("RUN", ["model/head=multistage"], "select/combined", ""),
    ("MULTIRUN", ["model/head=single_stage,multistage", "seed=1"], "select/combined",
     "a job of a multirun over model/head, ranked by select/combined"),
    ("MULTIRUN", ["data.fold=0,1,2", "seed=1,2"], "select/combined", ""),  # replicates: ranks nothing
    ("MULTIRUN", ["model/head=single_stage,multistage"], "val/combined", ""),  # ranked on what it reports
])
def test_a_run_is_ranked_only_in_a_multirun_over_settings_by_a_select_metric(tmp_path, mode, sweep, metric, ranked):
    assert inner_validation.multirun_ranking(run_config(metric=metric), hydra_node(tmp_path, mode, sweep)) == ranked


@pytest.mark.parametrize("cases, ranked_by, expected", [(None, "", 0), (None, "a tune.py trial", 0.16),
                                                         (3, "a tune.py trial", 3), (0.3, "", 0.3)])
def test_null_cases_become_a_number_and_a_number_is_kept(cases, ranked_by, expected):
    cfg = run_config(cases)
    inner_validation.resolve_inner_validation(cfg, ranked_by)
    assert cfg.data.inner_validation.cases == expected


def test_later_ddp_ranks_take_rank_zeros_answer(monkeypatch):
    monkeypatch.delenv(inner_validation.RANKED_ENV, raising=False)
    monkeypatch.setattr(inner_validation, "hydra_config", lambda: None)  # the later ranks run outside the multirun
    monkeypatch.setattr(inner_validation, "multirun_ranking", lambda cfg, hydra_cfg: "a job of a multirun")
    assert inner_validation.ranking_of_this_run(run_config(), is_first_process=True) == "a job of a multirun"
    monkeypatch.setattr(inner_validation, "multirun_ranking", lambda cfg, hydra_cfg: "")
    assert inner_validation.ranking_of_this_run(run_config(), is_first_process=False) == "a job of a multirun"
    assert inner_validation.ranking_of_this_run(run_config(), is_first_process=True) == ""  # the next job
    assert inner_validation.ranking_of_this_run(run_config(), is_first_process=False) == ""


def splits_of_train_py(monkeypatch, *argv: str) -> list[tuple[int, int]]:
    """(training cases, inner validation cases) of each job of ``train.py argv`` (prepare_only), in this process."""
    from pancreas_mtl.commands.train import main

    seen = []
    prepare = train_module.prepare

    def recording(cfg, *args, **kwargs):
        datamodule = prepare(cfg, *args, **kwargs)
        seen.append((len(datamodule.prepared.split.train), len(datamodule.prepared.split.inner)))
        return datamodule

    monkeypatch.setattr(train_module, "prepare", recording)
    monkeypatch.delenv(inner_validation.RANKED_ENV, raising=False)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    return seen


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """A folder of 15 training cases (5 per subtype) and 3 validation cases."""
    return write_distributed_dataset(tmp_path_factory.mktemp("inner") / "quiz", train_per_subtype=5)


def folder_run(root: Path, out: Path) -> list[str]:
    return ["experiment=cpu_demo", "data=folder", f"data.root={root}", "planning=small", "data.num_workers=0",
            "data.preprocessing_workers=0", "data.progress=false", "prepare_only=true", "logger=csv",
            f"paths.root_dir={REPO_ROOT}", f"paths.output_root={out}", f"hydra.run.dir={out}/run",
            f"hydra.sweep.dir={out}/multirun"]


def test_a_single_run_on_a_folder_trains_on_every_training_case(monkeypatch, folder_dataset, tmp_path):
    training_cases = len(list((folder_dataset / "train").glob("subtype*/*_0000.nii.gz")))
    assert training_cases == 15
    assert splits_of_train_py(monkeypatch, *folder_run(folder_dataset, tmp_path)) == [(15, 0)]


def test_a_sweep_over_settings_holds_the_inner_split_out_and_one_over_seeds_does_not(monkeypatch, folder_dataset,
                                                                                     tmp_path):
    ranked = splits_of_train_py(monkeypatch, "-m", *folder_run(folder_dataset, tmp_path / "heads"),
                                "model/head=single_stage,multistage")
    assert ranked == [(12, 3), (12, 3)]  # 0.16 of 15, at least one case of each subtype
    replicates = splits_of_train_py(monkeypatch, "-m", *folder_run(folder_dataset, tmp_path / "seeds"), "seed=1,2")
    assert replicates == [(15, 0), (15, 0)]
