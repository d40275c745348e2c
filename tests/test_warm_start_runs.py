"""Warm-started runs end to end through train.py's own entry point (``pretrained=PATH`` as typed): a fine-tune
from a segmentation run learns faster than the same steps from scratch, writes pretrained.json, resumes in
its own folder, refuses a checkpoint of another run beside a warm start; the two-phase recipe runs both
phases as one command; planning=from_pretrained takes an nnU-Net model's plan."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pancreas_mtl.files import sha256
from tests.test_resume_changes import train_with_hydra

pytestmark = pytest.mark.slow

WITH_VALIDATION = ["trainer.check_val_every_n_epoch=1", "module.validation.overlap=0.25"]


def last_metric(run_dir: Path, name: str) -> float:
    rows = [row for path in sorted(run_dir.glob("csv/version_*/metrics.csv"))
            for row in csv.DictReader(path.open()) if row.get(name)]
    return float(rows[-1][name])


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("warm_start_runs")  # synthetic data and cache shared by the runs below


@pytest.fixture(scope="module")
def segmentation_run(output_root) -> Path:
    """A segmentation-only run of 160 steps: the pretrained network."""
    run_dir = output_root / "segmentation"
    train_with_hydra(output_root, run_dir, "loss.cls_weight=0.0", "data.iterations_per_epoch=20",
                     "trainer.max_epochs=8", "callbacks.weight_averaging=null", *WITH_VALIDATION[1:])
    return run_dir


def test_a_fine_tune_from_a_segmentation_run_learns_faster_than_from_scratch(segmentation_run, output_root):
    source = segmentation_run / "checkpoints" / "last.ckpt"
    tuned, scratch = output_root / "tuned", output_root / "scratch"
    train_with_hydra(output_root, tuned, f"pretrained={source}", "pretrained.parts=backbone", *WITH_VALIDATION)
    train_with_hydra(output_root, scratch, *WITH_VALIDATION)
    report = json.loads((tuned / "pretrained.json").read_text())
    assert report["sha256"] == sha256(source) and report["source_format"] == "pancreas_mtl checkpoint"
    assert report["parts"] == "backbone" and report["counts"]["reinitialised"] == 0
    assert {entry["name"].split(".")[0] for entry in report["loaded"]} == {"backbone"}
    assert all(entry["name"].startswith("head.") for entry in report["skipped"])
    # 2 steps after the warm start against 2 steps from random weights
    tuned_dice, scratch_dice = (last_metric(run, "val/whole_pancreas_dice") for run in (tuned, scratch))
    assert tuned_dice > scratch_dice + 0.2, (tuned_dice, scratch_dice)
    assert not (scratch / "pretrained.json").exists()


def test_a_warm_started_run_resumes_in_its_folder_and_refuses_another_runs_checkpoint(segmentation_run,
                                                                                       output_root):
    source = segmentation_run / "checkpoints" / "last.ckpt"
    run_dir = output_root / "resumed"
    overrides = [f"pretrained={source}", "pretrained.lr_scale=0.5", "pretrained.freeze_epochs=1",
                 "callbacks.weight_averaging=null"]  # last.ckpt: the trained weights themselves, not an average
    train_with_hydra(output_root, run_dir, *overrides)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    groups = first["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("new", 1.0), ("pretrained", 0.5)]
    # the frozen first epoch left the loaded encoder as the source holds it
    source_state = torch.load(source, weights_only=True)["state_dict"]
    key = "model.backbone.stem.conv.weight"
    assert torch.equal(first["state_dict"][key], source_state[key])
    report = (run_dir / "pretrained.json").read_bytes()
    # the same command again, one epoch longer: resumes from its own last.ckpt, not from the source again
    train_with_hydra(output_root, run_dir, *overrides, "trainer.max_epochs=2")
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 4
    assert [g["name"] for g in second["optimizer_states"][0]["param_groups"]] == ["new", "pretrained"]
    assert (run_dir / "pretrained.json").read_bytes() == report
    # a checkpoint of another run beside a warm start: refused, one line, exit 1
    with pytest.raises(SystemExit) as exit_info:
        train_with_hydra(output_root, output_root / "refused", f"pretrained={source}",
                         f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert exit_info.value.code == 1
    assert not (output_root / "refused").exists()


def test_the_two_phase_recipe_trains_segmentation_then_the_multitask_fine_tune(output_root):
    run_dir = output_root / "two_phase"
    train_with_hydra(output_root, run_dir, "two_phase={segmentation:{loss:{cls_weight:0.0},trainer:{max_epochs:1}},"
                                           "parts:backbone}", "trainer.max_epochs=1")
    phase1 = torch.load(run_dir / "segmentation" / "checkpoints" / "last.ckpt", weights_only=True)
    phase2 = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert phase1["pancreas_mtl"]["config"]["loss"]["cls_weight"] == 0.0
    assert phase2["pancreas_mtl"]["config"]["loss"]["cls_weight"] == 1.0  # cpu_demo's
    report = json.loads((run_dir / "pretrained.json").read_text())
    assert report["source"] == str(run_dir / "segmentation" / "checkpoints" / "last.ckpt")
    assert report["parts"] == "backbone"


def test_planning_from_pretrained_takes_an_nnunet_models_plan_and_names_what_differs(segmentation_run, output_root):
    from pancreas_mtl.planning.plan import Plan
    from tests.test_warm_start import network, nnunet_model_folder

    own = Plan.from_dict(json.loads((segmentation_run / "plan.json").read_text()))
    source_plan = Plan.from_dict({**own.to_dict(), "features_per_stage": [8, 16, 24, 32, 32][:own.num_stages],
                                  "batch_size": 1})
    folder = output_root / "nnUNet_results" / "Dataset042_Abdomen" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    nnunet_model_folder(folder, network(source_plan), source_plan, num_classes=7)
    run_dir = output_root / "adopted"
    train_with_hydra(output_root, run_dir, "planning=from_pretrained", f"pretrained={folder}")
    adopted = json.loads((run_dir / "plan.json").read_text())
    assert adopted["features_per_stage"] == source_plan.features_per_stage and adopted["batch_size"] == 1
    assert adopted["target_spacing"] == list(own.target_spacing) and adopted["num_classes"] == 3
    report = json.loads((run_dir / "pretrained.json").read_text())
    assert report["source_format"] == "nnU-Net v2 model folder" and report["details"]["fold"] == 0
    assert report["counts"]["loaded"] > 0
    log_text = (run_dir / "cpu_demo.log").read_text()
    assert "differs from this dataset's own plan (preset M)" in log_text
    assert "features_per_stage: pretrained [8, 16" in log_text
