"""pancreas-mtl holdout and its comparison over seeds, on hand-built fixed-split sweeps: tiny checkpoints of
constant networks (tests/predict_helpers.py) with training logs (tests/notebook_inputs.py) in job folders
laid out as train.py -m writes them, on the tiny synthetic set (which has test labels)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pancreas_mtl.commands.cli import main
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.raw.splits import make_split
from pancreas_mtl.studies.holdout import chosen_checkpoint
from pancreas_mtl.evaluation.runs import read_run_metrics
from tests import notebook_inputs
from tests.predict_helpers import save_checkpoint, tiny_plan

QUIET = ["bootstrap=20", "progress=false", "plots=false", "device=cpu", "engine=torch"]
EPOCHS = 4  # notebook_inputs.training_run's log


def add_job(sweep: Path, number: int, dataset: Path, head: str, seed: int, class_bias, max_epochs: int = EPOCHS,
            select: bool = True, combined_metric=None, **data_changes) -> Path:
    """Job ``<number>/`` of a sweep: its config, overrides and CSV log, and the checkpoint model selection kept;
    with ``combined_metric`` its config holds those weights of the combined score (else none, as a run from
    before the key)."""
    job = notebook_inputs.training_run(sweep / str(number), seed=seed, overrides=(f"model/head={head}",))
    data = {"source": "folder", "root": str(dataset), "num_subtypes": 3, "split": "auto", "fold": 0,
            "inner_validation": {"cases": 2}, **data_changes}
    config = {"task_name": "train", "data": data, "trainer": {"max_epochs": max_epochs}}
    if combined_metric is not None:
        config["module"] = {"combined_metric": dict(combined_metric)}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "checkpoints").mkdir()
    name = "epoch0002-select0.6000.ckpt" if select else "last.ckpt"
    save_checkpoint(job / "checkpoints" / name, tiny_plan(), seed=seed, seg_bias=[0.0, 5.0, 0.0], class_bias=class_bias)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return job


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return notebook_inputs.tiny_dataset(tmp_path_factory.mktemp("holdout") / "synthetic", train=(2, 2, 2),
                                        validation=(1, 1, 1), test=(1, 1, 1))


@pytest.fixture(scope="module")
def scored(dataset, tmp_path_factory):
    """Two sweeps of two experiments: single_stage (seeds 1 and 2, always subtype 1) and multistage (seed 1
    in the first sweep, seed 2 in the second, always subtype 0); one more job that stopped early."""
    root = tmp_path_factory.mktemp("sweeps")
    first, second = root / "first", root / "second"
    add_job(first, 0, dataset, "single_stage", 1, [0.0, 3.0, 0.0])
    add_job(first, 1, dataset, "single_stage", 2, [0.0, 3.0, 0.0])
    add_job(first, 2, dataset, "multistage", 1, [3.0, 0.0, 0.0])
    add_job(first, 3, dataset, "multistage", 3, [3.0, 0.0, 0.0], max_epochs=10)  # its log ends at epoch 4 of 10
    add_job(second, 0, dataset, "multistage", 2, [3.0, 0.0, 0.0])
    for sweep in (first, second):
        assert main(["holdout", f"multirun={sweep}", "checkpoint=selected", *QUIET]) == 0
    return first, second


def test_holdout_scores_each_finished_job_on_validation_and_test(scored, dataset):
    first, _ = scored
    index = discover(dataset)
    result = json.loads((first / "holdout" / "holdout.json").read_text())
    assert [job["job"] for job in result["jobs"]] == ["0", "1", "2"] and result["unfinished"] == ["3"]
    assert result["splits"] == ["validation", "test"] and result["dataset"] == str(index.root)
    for job in result["jobs"]:
        checkpoint = first / job["job"] / "checkpoints" / "epoch0002-select0.6000.ckpt"
        assert job["checkpoint"] == str(checkpoint)
        assert job["selected_on"].startswith("inner validation")
        for split, cases in (("validation", index.split("validation")), ("test", index.split("test"))):
            folder = first / "holdout" / job["job"] / split
            predicted = sorted(p.name[: -len(".nii.gz")] for p in (folder / "predictions").glob("*.nii.gz"))
            assert predicted == sorted(case.case_id for case in cases)
            records = [json.loads(p.read_text()) for p in (folder / "predictions" / ".records").glob("*.json")
                       if not p.name.startswith(".")]  # the case records (.run.json, .tables.json: the folder's)
            assert {tuple(r["checkpoints"]) for r in records} == {(str(checkpoint),)}
            with open(folder / "evaluation" / "per_case.csv") as stream:
                assert sorted(row["case_id"] for row in csv.DictReader(stream)) == predicted
            assert job["scores"][split]["num_cases"] == len(cases) == 3
    single, multi = result["jobs"][0]["scores"], result["jobs"][2]["scores"]
    assert single["validation"]["macro_f1"] == pytest.approx(1 / 6)  # subtype 1 for the three subtypes' cases
    assert multi["test"]["macro_f1"] == pytest.approx(1 / 6)
    assert single["validation"]["whole_pancreas_dice"] < 1  # pancreas everywhere
    log = notebook_inputs.training_run(first.parent / "log_again", seed=1)  # the same seed writes the same log
    f1 = [row["val/macro_f1"] for row in read_run_metrics(log) if "val/macro_f1" in row]
    assert result["jobs"][0]["training"] == {"epochs": EPOCHS, "final_f1": pytest.approx(f1[-1]),
                                             "best_f1": pytest.approx(max(f1))}


def test_compare_groups_the_seeds_of_each_experiment_across_sweeps(scored, tmp_path, capsys):
    first, second = scored
    out = tmp_path / "compare"
    assert main(["compare", f"runs=[{first},{second / 'holdout'}]", f"out={out}", "metric=macro_f1"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["source"] == "holdout.json" and report["split"] == "validation"
    rows = {row["name"]: row for row in report["ranking"]}
    assert set(rows) == {"model/head=single_stage", "model/head=multistage"}  # seeds pooled, the unfinished job left out
    assert rows["model/head=multistage"]["members"] == [str(first / "2"), str(second / "0")]
    jobs = [job for sweep in scored for job in json.loads((sweep / "holdout" / "holdout.json").read_text())["jobs"]]
    for name, members in (("model/head=single_stage", jobs[:2]), ("model/head=multistage", jobs[2:])):
        row = rows[name]
        assert row["runs"] == 2
        dice = [job["scores"]["test"]["whole_pancreas_dice"] for job in members]
        assert row["test/whole_pancreas_dice"] == pytest.approx(np.mean(dice))
        assert row["test/whole_pancreas_dice_sd"] == pytest.approx(np.std(dice, ddof=1))
        gaps = [job["training"]["best_f1"] - job["training"]["final_f1"] for job in members]
        assert row["best_minus_final_f1"] == pytest.approx(np.mean(gaps))
    markdown = (out / "compare.md").read_text()
    assert markdown.startswith("| rank | experiment | runs | validation macro_f1 |") and " ± " in markdown
    with open(out / "compare.csv") as stream:
        assert [row["name"] for row in csv.DictReader(stream)] == [row["name"] for row in report["ranking"]]
    assert "model/head=multistage" in capsys.readouterr().out


def test_compare_refuses_mixed_kinds_ensembles_and_unscored_splits(scored, tmp_path):
    first, _ = scored
    notebook_inputs.crossval_summary(tmp_path / "cv", tmp_path, 0.5)
    assert main(["compare", f"runs=[{first},{tmp_path / 'cv'}]", f"out={tmp_path / 'a'}"]) == 1
    assert main(["compare", f"runs=[{first}]", f"out={tmp_path / 'b'}", "ensembles=true"]) == 1
    assert main(["compare", f"runs=[{first}]", f"out={tmp_path / 'c'}", "split=train"]) == 1
    assert not any((tmp_path / name).exists() for name in "abc")


def test_each_checkpoint_rule_is_an_experiment_of_its_own(scored, tmp_path):
    first, _ = scored
    other = tmp_path / "named"
    assert main(["holdout", f"multirun={first}", f"out={other}", "checkpoint=epoch0002-select0.6000.ckpt",
                 "splits=[validation]", *QUIET]) == 0
    assert not (first / "holdout" / "named").exists() and (other / "holdout.json").is_file()
    assert {job["selected_on"] for job in json.loads((other / "holdout.json").read_text())["jobs"]} == {"named"}
    assert main(["compare", f"runs=[{first},{other}]", f"out={tmp_path / 'compare'}"]) == 0
    ranking = json.loads((tmp_path / "compare" / "compare.json").read_text())["ranking"]
    assert sorted(row["name"] for row in ranking) == sorted(
        f"model/head={head} checkpoint={rule}" for head in ("single_stage", "multistage")
        for rule in ("selected", "epoch0002-select0.6000.ckpt"))
    assert {row["runs"] for row in ranking} == {1, 2} and all(row["splits"] == ["validation", "test"] for row in ranking)


def test_each_job_is_scored_by_its_own_combined_score(scored, dataset, tmp_path, capsys):
    """A job trained with seg_only's combined score (the two Dice) is scored by it, the others by the default
    weights (their configs hold none); compare does not rank the two kinds by combined."""
    first, _ = scored
    default = {"whole_pancreas_dice": 1.0, "lesion_dice": 1.0, "macro_f1": 1.0}
    for job in json.loads((first / "holdout" / "holdout.json").read_text())["jobs"]:
        scores = job["scores"]["validation"]
        assert job["combined_metric"] == default
        assert scores["combined"] == pytest.approx(np.mean([scores[name] for name in default]))
    seg_only = tmp_path / "seg_only"
    weights = {"whole_pancreas_dice": 1.0, "lesion_dice": 1.0}
    add_job(seg_only, 0, dataset, "none", 1, [0.0, 3.0, 0.0], combined_metric=weights)
    assert main(["holdout", f"multirun={seg_only}", "checkpoint=selected", "splits=[validation]", *QUIET]) == 0
    [job] = json.loads((seg_only / "holdout" / "holdout.json").read_text())["jobs"]
    scores = job["scores"]["validation"]
    assert job["combined_metric"] == weights and scores["macro_f1"] is not None
    assert scores["combined"] == pytest.approx((scores["whole_pancreas_dice"] + scores["lesion_dice"]) / 2)
    assert main(["compare", f"runs=[{first},{seg_only}]", f"out={tmp_path / 'by_combined'}"]) == 1
    err = capsys.readouterr().err
    assert "weigh their combined score differently" in err and "model/head=none" in err
    assert main(["compare", f"runs=[{first},{seg_only}]", f"out={tmp_path / 'by_dice'}", "metric=lesion_dice"]) == 0


def test_unfinished_jobs_are_an_error_when_asked(scored, capsys):
    first, _ = scored
    assert main(["holdout", f"multirun={first}", "checkpoint=selected", "unfinished=error", *QUIET]) == 1
    assert f"job {first / '3'} has not trained all its epochs" in capsys.readouterr().err


def test_a_kfold_job_is_scored_on_its_own_held_out_training_cases(dataset, tmp_path):
    sweep = tmp_path / "kfold"
    add_job(sweep, 0, dataset, "single_stage", 1, [0.0, 3.0, 0.0], select=False, split="kfold", fold=1, num_folds=3)
    assert main(["holdout", f"multirun={sweep}", "splits=[validation]", *QUIET]) == 0  # the default: last.ckpt
    expected = make_split(discover(dataset), "kfold", 1, 3, 12345).val
    predicted = sorted(p.name[: -len(".nii.gz")] for p in (sweep / "holdout" / "0" / "validation" / "predictions").glob("*.nii.gz"))
    assert predicted == expected and all(case.startswith("quiz_") for case in expected)
    assert json.loads((sweep / "holdout" / "holdout.json").read_text())["splits"] == ["validation"]


def test_the_chosen_checkpoint_is_the_one_model_selection_kept(tmp_path):
    job = tmp_path / "0"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").touch()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint chosen by model selection .*\['last.ckpt'\]"):
        chosen_checkpoint(job)
    assert chosen_checkpoint(job, "last.ckpt") == job / "checkpoints" / "last.ckpt"
    for name in ("epoch0004-select0.5.ckpt", "epoch0009-select0.7.ckpt"):
        (job / "checkpoints" / name).touch()
    with pytest.raises(ValueError, match="model selection left 2 checkpoints"):
        chosen_checkpoint(job)
    with pytest.raises(FileNotFoundError, match="no checkpoint checkpoints/best.ckpt"):
        chosen_checkpoint(job, "best.ckpt")
