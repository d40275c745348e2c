"""pancreas-mtl crossval and compare on hand-built two-fold sweeps: tiny checkpoints of constant networks
(tests/predict_helpers.py) in job folders laid out as train.py -m writes them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from pancreas_mtl.commands.cli import main
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.raw.splits import make_split
from pancreas_mtl.studies.crossval import read_sweep
from tests.conftest import write_distributed_dataset
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases
from tests.wandb_records import finished_records

NUM_FOLDS = 2
QUIET = ["bootstrap=50", "progress=false", "plots=false"]
SEG_ONLY_WEIGHTS = {"whole_pancreas_dice": 1.0, "lesion_dice": 1.0, "macro_f1": 0.0}  # experiment=seg_only's


def make_sweep(folder: Path, dataset: Path, folds=(0, 1), seg_bias=(0.0, 5.0, 0.0), data_in_checkpoint=(1,),
               combined_metric=None, **data_changes) -> Path:
    """A sweep folder as ``train.py -m data.fold=0,1`` leaves it: ``<n>/.hydra/config.yaml`` and
    ``<n>/checkpoints/last.ckpt``. Jobs in ``data_in_checkpoint`` also carry the resolved data config in
    their checkpoint, as training writes it; the others only the model's (the config file is read). With
    ``combined_metric`` the run configs hold those weights of the combined score (else none: a run from
    before the key, scored with conf/module/default.yaml's)."""
    for job, fold in enumerate(folds):
        data = {"source": "folder", "root": str(dataset), "num_subtypes": 3, "split": "kfold", "fold": fold,
                "num_folds": NUM_FOLDS, "split_seed": 12345, **data_changes}
        job_dir = folder / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        config = {"task_name": "train", "data": data}
        if combined_metric is not None:
            config["module"] = {"combined_metric": dict(combined_metric)}
        (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job_dir / "checkpoints").mkdir()
        path = save_checkpoint(job_dir / "checkpoints" / "last.ckpt", tiny_plan(), seed=fold, seg_bias=list(seg_bias),
                               class_bias=[2.0, 0.0, 0.0])
        if job in data_in_checkpoint:
            saved = torch.load(path, weights_only=True)
            saved["pancreas_mtl"]["config"]["data"] = data
            torch.save(saved, path)
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_distributed_dataset(tmp_path_factory.mktemp("crossval") / "quiz")


@pytest.fixture(scope="module")
def swept(dataset, tmp_path_factory):
    """Two cross-validated experiments: A predicts pancreas everywhere (probability 0.99), B background
    (0.91); their mean probabilities still say pancreas."""
    root = tmp_path_factory.mktemp("sweeps")
    a = make_sweep(root / "a", dataset, seg_bias=(0.0, 5.0, 0.0))
    b = make_sweep(root / "b", dataset, seg_bias=(3.0, 0.0, 0.0))
    assert main(["crossval", f"multirun={a}", "save_probabilities=true", "device=cpu", *QUIET[:-1]]) == 0
    assert main(["crossval", f"multirun={b}", "save_probabilities=true", "device=cpu", *QUIET]) == 0
    return a, b


def test_crossval_predicts_every_case_once_with_its_folds_checkpoint(swept, dataset):
    a, _ = swept
    index = discover(dataset)
    labelled = sorted(case.case_id for case in index.labelled)
    out = a / "crossval"
    per_fold = {fold: sorted(p.name[: -len(".nii.gz")] for p in (out / "predictions" / f"fold_{fold}").glob("*.nii.gz"))
                for fold in range(NUM_FOLDS)}
    for fold, cases in per_fold.items():  # the held-out cases of the split training used
        assert cases == make_split(index, "kfold", fold, NUM_FOLDS, 12345).val
        records = [json.loads(p.read_text()) for p in (out / "predictions" / f"fold_{fold}" / ".records").glob("q*.json")]
        assert {r["fold"] for r in records} == {fold}
        assert {tuple(r["checkpoints"]) for r in records} == {(str(a / str(fold) / "checkpoints" / "last.ckpt"),)}
    assert sorted(c for cases in per_fold.values() for c in cases) == labelled
    with open(out / "evaluation" / "per_case.csv") as stream:
        assert sorted(row["case_id"] for row in csv.DictReader(stream)) == labelled
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["num_cases"] == len(labelled)
    dice = summary["segmentation"]["whole_pancreas_dice"]
    assert 0 < dice["mean"] < 1 and dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    assert summary["classification"]["macro_f1"] == pytest.approx(1 / 6)  # subtype 0 for every case
    assert "macro_f1" in summary["classification"]["ci"]
    assert (out / "evaluation" / "dice_by_subtype.png").is_file()
    result = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in result["folds"]] == [0, 1] and result["num_cases"] == len(labelled)
    assert result["scores"]["combined"] == pytest.approx(
        (dice["mean"] + summary["segmentation"]["lesion_dice"]["mean"] + 1 / 6) / 3)


def test_crossval_rerun_skips_finished_cases(swept):
    a, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (a / "crossval" / "predictions").rglob("*.nii.gz")}
    assert main(["crossval", f"multirun={a}", "save_probabilities=true", "device=cpu", *QUIET]) == 0
    assert {p: p.stat().st_mtime_ns for p in (a / "crossval" / "predictions").rglob("*.nii.gz")} == before


def test_predict_accepts_the_fold_ensemble(swept, tmp_path):
    a, _ = swept
    ensemble = a / "crossval" / "ensemble.yaml"
    listed = [member["checkpoint"] for member in yaml.safe_load(ensemble.read_text())["members"]]
    assert listed == [f"../{fold}/checkpoints/last.ckpt" for fold in range(NUM_FOLDS)]  # from the file's folder
    names = write_cases(tmp_path / "images", count=1)
    for ckpt, output in ((ensemble, tmp_path / "by_file"), (a / "crossval", tmp_path / "by_folder")):
        summary = run_predict([f"ckpt={ckpt}", f"input={tmp_path / 'images'}", f"output={output}"])
        assert summary.predicted == names
        run = json.loads((output / ".records" / ".run.json").read_text())
        assert len(run["identity"]["networks"]) == NUM_FOLDS


def test_an_ensemble_file_without_members_is_refused(tmp_path):
    from pancreas_mtl.inference.checkpoint import ENSEMBLE_FORMAT, expand_checkpoints

    (tmp_path / "ensemble.yaml").write_text(f"format: {ENSEMBLE_FORMAT}\nfolds: [0, 1]\n")
    with pytest.raises(ValueError, match="gives 'plan_sha256' and a non-empty 'members' list"):
        expand_checkpoints([str(tmp_path)])
    # a hand-written list has no digests to check: the checkpoints are passed themselves instead
    (tmp_path / "other.yaml").write_text("checkpoints: [fold0.ckpt, /abs/fold1.ckpt]\n")
    with pytest.raises(ValueError, match=re.escape("ckpt=[a.ckpt,b.ckpt]")):
        expand_checkpoints([tmp_path / "other.yaml", "x.ckpt"])
    assert expand_checkpoints(["x.ckpt", tmp_path / "absent.yaml"]) == ["x.ckpt", str(tmp_path / "absent.yaml")]


def test_compare_ranks_experiments_and_scores_their_ensemble(swept, tmp_path, capsys):
    a, b = swept
    out = tmp_path / "compare"
    assert main(["compare", f"runs=[{b},{a / 'crossval'}]", f"out={out}", "ensembles=true", *QUIET]) == 0
    ranking = json.loads((out / "compare.json").read_text())["ranking"]
    a_name, b_name = str(a / "crossval"), str(b)
    assert [row["name"] for row in ranking] == [a_name, f"{b_name} + {a_name}", b_name]  # ties keep run order
    assert ranking[2]["whole_pancreas_dice"] == 0 < ranking[0]["whole_pancreas_dice"]
    assert ranking[1]["whole_pancreas_dice"] == pytest.approx(ranking[0]["whole_pancreas_dice"])  # averaged
    assert ranking[1]["num_cases"] == 9 and (Path(ranking[1]["folder"]) / "evaluation" / "summary.json").is_file()
    with open(out / "compare.csv") as stream:
        assert [row["rank"] for row in csv.DictReader(stream)] == ["1", "2", "3"]
    assert "rank" in capsys.readouterr().out
    # another comparison into the same folder is refused; overwrite=true replaces it (the ensembles' folders too)
    assert main(["compare", f"runs=[{b}]", f"out={out}", "metric=whole_pancreas_hd95", *QUIET]) == 1
    assert "holds the outputs of compare made with another model, inputs or settings" in capsys.readouterr().err
    assert main(["compare", f"runs=[{b}]", f"out={out}", "metric=whole_pancreas_hd95", "overwrite=true", *QUIET]) == 0
    assert json.loads((out / "compare.json").read_text())["metric"] == "whole_pancreas_hd95"


@pytest.mark.parametrize("problem, expected", [
    ("single_run", "not a multirun folder"),
    ("no_checkpoint", "has no checkpoint checkpoints/last.ckpt"),
    ("fold_twice", "fold 0 in jobs 0, 1"),
    ("fold_missing", "fold(s) [1] of 2 missing"),
    ("settings_differ", "data.split_seed: 12345 in 0, 7 in 1"),
    ("checkpoint_of_other_fold", "trained on fold 0, but its job's config"),
    ("validation_folder", "one held-out set rather than folds"),
    ("weights_differ", "job 1: {'lesion_dice': 1.0, 'macro_f1': 0.0, 'whole_pancreas_dice': 1.0}"),
])
def test_crossval_refuses_what_is_not_one_cross_validation(problem, expected, dataset, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    if problem == "single_run":
        make_sweep(sweep, dataset, folds=(0,))
        sweep = sweep / "0"
    elif problem == "no_checkpoint":
        make_sweep(sweep, dataset)
        (sweep / "1" / "checkpoints" / "last.ckpt").unlink()
    elif problem == "fold_twice":
        make_sweep(sweep, dataset, folds=(0, 0))
    elif problem == "fold_missing":
        make_sweep(sweep, dataset, folds=(0,))
    elif problem == "settings_differ":
        make_sweep(sweep, dataset)
        config = sweep / "1" / ".hydra" / "config.yaml"
        saved = yaml.safe_load(config.read_text())
        saved["data"]["split_seed"] = 7
        config.write_text(yaml.safe_dump(saved))
        ckpt = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)
        ckpt["pancreas_mtl"]["config"]["data"]["split_seed"] = 7
        torch.save(ckpt, sweep / "1" / "checkpoints" / "last.ckpt")
    elif problem == "checkpoint_of_other_fold":
        make_sweep(sweep, dataset, data_in_checkpoint=(0, 1))
        (sweep / "1" / "checkpoints" / "last.ckpt").write_bytes((sweep / "0" / "checkpoints" / "last.ckpt").read_bytes())
    elif problem == "validation_folder":
        make_sweep(sweep, dataset, folds=(0,), split="auto")
    elif problem == "weights_differ":  # fold 1 trained with seg_only's combined score, fold 0 with the default
        make_sweep(sweep, dataset)
        ckpt = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)
        ckpt["pancreas_mtl"]["config"]["module"] = {"combined_metric": SEG_ONLY_WEIGHTS}
        torch.save(ckpt, sweep / "1" / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_sweep(sweep)
    assert main(["crossval", f"multirun={sweep}", *QUIET]) == 1
    assert expected in capsys.readouterr().err


def test_crossval_and_compare_rank_a_sweep_by_its_own_combined_score(swept, dataset, tmp_path, capsys):
    """A sweep trained with seg_only's combined score (the two Dice) is scored, and ranked, by that score, not
    by the default's mean of three (its networks do have a head here, so macro F1 is defined)."""
    a, _ = swept
    seg_only = make_sweep(tmp_path / "seg_only", dataset, combined_metric=SEG_ONLY_WEIGHTS)
    assert main(["crossval", f"multirun={seg_only}", "device=cpu", *QUIET]) == 0
    result = json.loads((seg_only / "crossval" / "crossval.json").read_text())
    summary = json.loads((seg_only / "crossval" / "evaluation" / "summary.json").read_text())
    dice = [summary["segmentation"][name]["mean"] for name in ("whole_pancreas_dice", "lesion_dice")]
    assert result["combined_metric"] == SEG_ONLY_WEIGHTS
    assert result["scores"]["macro_f1"] == pytest.approx(1 / 6)  # defined, and not part of this score
    assert result["scores"]["combined"] == pytest.approx(sum(dice) / 2)
    assert result["scores"]["combined"] != pytest.approx((sum(dice) + 1 / 6) / 3)
    assert json.loads((a / "crossval" / "crossval.json").read_text())["combined_metric"] == {
        "whole_pancreas_dice": 1.0, "lesion_dice": 1.0, "macro_f1": 1.0}  # a's runs hold none: the YAML's
    out = tmp_path / "compare"
    assert main(["compare", f"runs=[{seg_only}]", f"out={out}", *QUIET]) == 0
    [row] = json.loads((out / "compare.json").read_text())["ranking"]
    assert row["combined"] == pytest.approx(sum(dice) / 2) and row["combined_metric"] == SEG_ONLY_WEIGHTS
    # ranked by combined beside a sweep that weighs it otherwise, two different scores would be ranked
    assert main(["compare", f"runs=[{seg_only},{a}]", f"out={tmp_path / 'mixed'}", *QUIET]) == 1
    err = capsys.readouterr().err
    assert "weigh their combined score differently" in err and str(seg_only) in err and str(a) in err
    assert main(["compare", f"runs=[{seg_only},{a}]", f"out={tmp_path / 'by_dice'}", "metric=lesion_dice",
                 *QUIET]) == 0


@pytest.mark.slow
def test_crossval_of_a_trained_two_fold_sweep(tmp_path):
    """Two folds trained by train.py's train() for two steps each, their run configs saved as Hydra saves
    them (interpolations kept), then cross-validated: every labelled case of the set once."""
    from omegaconf import OmegaConf

    from tests.test_experiments import compose_train
    from pancreas_mtl.training.train import train

    sweep = tmp_path / "multirun" / "2026-12-01_00-00-00"
    for fold in range(NUM_FOLDS):
        job = sweep / str(fold)
        cfg = compose_train(tmp_path / "outputs", job, [
            "experiment=cpu_demo", "trainer.max_epochs=1", "data.iterations_per_epoch=2",
            "trainer.check_val_every_n_epoch=1", "callbacks.rich_progress_bar=null",
            "callbacks.rich_model_summary=null", "data.split=kfold", f"data.num_folds={NUM_FOLDS}", f"data.fold={fold}"])
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
        train(cfg)
    assert main(["crossval", f"multirun={sweep}", "device=cpu", *QUIET]) == 0
    result = json.loads((sweep / "crossval" / "crossval.json").read_text())
    labelled = discover(result["dataset"]).labelled
    assert result["num_cases"] == len(labelled) == sum(len(fold["held_out"]) for fold in result["folds"])
    assert (sweep / "crossval" / "evaluation" / "summary.json").is_file()


def test_crossval_logs_its_summary_as_a_wandb_run_of_the_sweeps_group(swept, monkeypatch, tmp_path):
    a, _ = swept
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "crossval"
    assert main(["crossval", f"multirun={a}", f"out={out}", "device=cpu", "wandb=true", *QUIET]) == 0
    [run_file] = list((out / "wandb").glob("offline-run-*/*.wandb"))
    finished_records(run_file)    # wandb-core may still be flushing the file when the run has finished
    blob = run_file.read_bytes()  # the offline run's records (protobuf: strings stay readable)
    # job_type and name "crossval", the group of the sweep's training runs, the scores and the per-case table
    for expected in (b"crossval", f"train_{a.name}".encode(), b"crossval/combined", b"per_case"):
        assert expected in blob, expected
