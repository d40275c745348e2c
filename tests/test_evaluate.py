"""Evaluation: surface distances and Dice on hand-made masks with known answers, the reference layouts
(mask folder + subtypes, split folder, dataset root, the synthetic set's test_labels), the written
tables and plots, bootstrap intervals, and mismatched case sets."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.commands.cli import main as cli_main
from pancreas_mtl.evaluation.evaluate import EvaluationConfig, evaluate, format_summary, score_case
from pancreas_mtl.evaluation.metrics import (
    hausdorff_distance_95,
    image_diagonal_mm,
    normalised_surface_dice,
    segmentation_metrics,
)
from pancreas_mtl.evaluation.roc import roc_curve
from pancreas_mtl.evaluation.summary import summarise
from tests.conftest import lps_affine, write_distributed_dataset

# --- known answers ----------------------------------------------------------------------------------------

def test_parallel_planes_have_known_distances():
    """Two one-voxel planes 3 voxels apart along x at 0.5 mm: every border voxel is 1.5 mm from the other."""
    spacing = (2.0, 1.0, 0.5)
    a, b = np.zeros((6, 8, 20), bool), np.zeros((6, 8, 20), bool)
    a[:, :, 10] = True
    b[:, :, 13] = True
    assert hausdorff_distance_95(a, b, spacing) == pytest.approx(1.5)
    assert normalised_surface_dice(a, b, spacing, tolerance_mm=1.0) == 0.0
    assert normalised_surface_dice(a, b, spacing, tolerance_mm=2.0) == 1.0
    # along z the same shift is 3 x 2 mm
    c, d = np.zeros((12, 8, 8), bool), np.zeros((12, 8, 8), bool)
    c[3], d[6] = True, True
    assert hausdorff_distance_95(c, d, spacing) == pytest.approx(6.0)


def main(argv):
    """``pancreas-mtl evaluate`` (``python -m pancreas_mtl evaluate``) with these arguments."""
    return cli_main(["evaluate", *argv])


def test_empty_mask_conventions():
    """A miss (only one mask empty) scores the image diagonal, the worst case, not NaN: left out of the
    mean, a miss would make mean HD95 look better. Both empty is a correct 'nothing there': 0."""
    empty, cube = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert hausdorff_distance_95(empty, empty, (1, 1, 1)) == 0.0
    assert hausdorff_distance_95(cube, empty, (1, 1, 1)) == pytest.approx(math.sqrt(75))   # spurious
    assert hausdorff_distance_95(empty, cube, (2, 1, 1)) == pytest.approx(math.sqrt(150))  # missed
    assert math.isnan(hausdorff_distance_95(empty, cube, (1, 1, 1), miss_value=float("nan")))
    assert hausdorff_distance_95(cube, cube, (1, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(cube, empty, (1, 1))


def test_image_diagonal_is_worse_than_any_distance():
    """The diagonal of the image's extent in mm (shape x spacing): more than the farthest two voxel
    centres, so a miss always scores worse than the worst hit."""
    shape, spacing = (6, 9, 11), (2.5, 0.7, 0.9)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(math.sqrt(15 ** 2 + 6.3 ** 2 + 9.9 ** 2))
    corners = np.zeros(shape, bool), np.zeros(shape, bool)
    corners[0][0, 0, 0], corners[1][-1, -1, -1] = True, True
    assert hausdorff_distance_95(*corners, spacing) < image_diagonal_mm(shape, spacing)


def test_segmentation_metrics_flag_misses():
    truth = label_map()
    no_lesion = np.where(truth == 2, 1, truth).astype(np.uint8)
    scores = segmentation_metrics(no_lesion, truth, spacing=(2.0, 0.8, 0.8))
    assert scores["lesion_miss"] == 1 and scores["whole_pancreas_miss"] == 0
    assert scores["lesion_hd95"] == pytest.approx(image_diagonal_mm(truth.shape, (2.0, 0.8, 0.8)))
    assert scores["lesion_dice"] == 0.0 and scores["lesion_nsd"] == 0.0  # already the worst value
    both_empty = segmentation_metrics(no_lesion, no_lesion, spacing=(2.0, 0.8, 0.8))
    assert both_empty["lesion_miss"] == 0 and both_empty["lesion_hd95"] == 0.0


def label_map(shape=(8, 12, 12), pancreas=((1, 7), (2, 10), (2, 10)), lesion=((3, 5), (4, 8), (4, 8))) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[tuple(slice(*r) for r in pancreas)] = 1
    labels[tuple(slice(*r) for r in lesion)] = 2
    return labels


def test_score_case_known_dice(tmp_path):
    """Lesion 2x4x4 = 32 voxels shifted by one voxel along x: overlap 24, Dice 0.75; gland unchanged."""
    truth, shifted = label_map(), label_map(lesion=((3, 5), (4, 8), (5, 9)))
    write_nifti(truth, lps_affine((2.0, 0.8, 0.8)), tmp_path / "t.nii.gz")
    write_nifti(shifted.astype(np.float32) * 1.0000153, lps_affine((2.0, 0.8, 0.8)), tmp_path / "p.nii.gz")
    scores = score_case("case", tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", tolerance_mm=1.0)
    assert scores["whole_pancreas_dice"] == 1.0 and scores["lesion_dice"] == pytest.approx(0.75)
    assert scores["whole_pancreas_nsd"] == 1.0 and scores["whole_pancreas_hd95"] == 0.0
    assert scores["lesion_hd95"] == pytest.approx(0.8)  # the shifted faces, one voxel (0.8 mm) apart
    write_nifti(truth, lps_affine((2.0, 0.8, 0.9)), tmp_path / "other_grid.nii.gz")
    with pytest.raises(ValueError, match="another grid"):
        score_case("case", tmp_path / "other_grid.nii.gz", tmp_path / "t.nii.gz", 1.0)


def test_roc_curve_and_summary_scores():
    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([True, False, True, False]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    rows = [{"case_id": f"c{i}", "subtype": s, "predicted_subtype": p, "whole_pancreas_dice": d, "lesion_dice": d,
             "whole_pancreas_nsd": d, "lesion_nsd": d, "whole_pancreas_hd95": h, "lesion_hd95": h,
             "whole_pancreas_miss": 0, "lesion_miss": int(d == 0.0)}
            for i, (s, p, d, h) in enumerate([(0, 0, 1.0, 1.0), (1, 1, 0.5, float("nan")), (2, 1, 0.0, 30.0),
                                              (2, 2, 0.5, 2.0)])]
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7]])
    first = summarise(rows, probabilities, bootstrap=200, seed=1)
    again = summarise(rows, probabilities, bootstrap=200, seed=1)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)  # NaN != NaN in a dict compare
    seg = first["segmentation"]
    assert seg["lesion_dice"]["mean"] == 0.5
    # the miss (30 mm, its image diagonal) counts in the mean; the NaN is still left out and counted
    assert seg["lesion_hd95"]["mean"] == pytest.approx(11.0) and seg["lesion_hd95"]["undefined"] == 1
    assert seg["lesion_hd95"]["misses"] == 1 and first["lesion_misses"] == 1 and first["whole_pancreas_misses"] == 0
    assert 0.0 <= seg["lesion_dice"]["ci_low"] <= 0.5 <= seg["lesion_dice"]["ci_high"] <= 1.0
    scores = first["classification"]
    assert scores["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert scores["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores["auroc_0"] == 1.0 and scores["auroc_2"] == 1.0 and scores["auroc_1"] == pytest.approx(1.0)
    assert first["per_subtype"]["2"]["num_cases"] == 2 and first["per_subtype"]["2"]["lesion_dice"] == 0.25
    assert scores["declared_subtypes"] == 3
    printed = format_summary(first)
    assert "1 miss" in printed and "macro over 3 declared subtypes" in printed


def test_summary_macro_f1_counts_a_declared_subtype_nobody_has():
    """The issue's toy case: no reference or predicted subtype 2. Macro F1 over the 3 declared subtypes is
    (4/5 + 2/3 + 0) / 3 = 0.489, not 0.733 over the two present."""
    rows = [{"case_id": f"c{i}", "subtype": s, "predicted_subtype": p, **dict.fromkeys(
             ("whole_pancreas_dice", "lesion_dice", "whole_pancreas_nsd", "lesion_nsd"), 1.0),
             "whole_pancreas_hd95": 0.0, "lesion_hd95": 0.0, "whole_pancreas_miss": 0, "lesion_miss": 0}
            for i, (s, p) in enumerate([(0, 0), (0, 0), (0, 1), (1, 1)])]
    scores = summarise(rows, None, bootstrap=20)["classification"]
    assert scores["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 3)
    assert scores["f1_2"] != scores["f1_2"]  # per subtype it stays undefined (NaN)
    assert summarise(rows, None, bootstrap=0, num_subtypes=2)["classification"]["macro_f1"] == pytest.approx(11 / 15)


# --- folders ------------------------------------------------------------------------------------------------

def write_pair(gt: Path, pred: Path, case: str, truth: np.ndarray, prediction: np.ndarray) -> None:
    write_nifti(truth, lps_affine(), gt / f"{case}.nii.gz")
    write_nifti(prediction, lps_affine(), pred / f"{case}.nii.gz")


def make_folders(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_pair(gt, pred, "quiz_001", label_map(), label_map())
    write_pair(gt, pred, "quiz_002", label_map(), label_map(lesion=((3, 5), (4, 8), (5, 9))))
    write_pair(gt, pred, "quiz_003", label_map(), np.zeros((8, 12, 12), np.uint8))
    (gt / "subtypes.json").write_text(json.dumps({"quiz_001": 0, "quiz_002": 1, "quiz_003": 2}))
    (pred / "subtype_results.csv").write_text(
        "Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,1\nquiz_003.nii.gz,1\n")
    (pred / "subtype_probabilities.csv").write_text(
        "Names,p0,p1,p2\nquiz_001.nii.gz,0.7,0.2,0.1\nquiz_002.nii.gz,0.1,0.8,0.1\nquiz_003.nii.gz,0.2,0.5,0.3\n")
    return gt, pred


def test_evaluate_writes_tables_and_plots(tmp_path):
    gt, pred = make_folders(tmp_path)
    out = tmp_path / "eval"
    evaluation = evaluate({"pred": str(pred), "gt": str(gt), "out": str(out), "bootstrap": 100, "progress": False,
                           "plots": _has_matplotlib()})
    lines = (out / "per_case.csv").read_text().splitlines()
    assert lines[0].startswith("case_id,subtype,predicted_subtype,p0,p1,p2,whole_pancreas_dice,lesion_dice")
    assert lines[2].split(",")[:3] == ["quiz_002", "1", "1"] and len(lines) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segmentation"]["lesion_dice"]["mean"] == pytest.approx((1 + 0.75 + 0) / 3)
    diagonal = image_diagonal_mm((8, 12, 12), (2.0, 0.8, 0.8))             # quiz_003: the empty prediction
    assert summary["segmentation"]["lesion_hd95"]["mean"] == pytest.approx((0 + 0.8 + diagonal) / 3)
    assert summary["segmentation"]["lesion_hd95"]["undefined"] == 0
    assert summary["segmentation"]["lesion_hd95"]["misses"] == 1 and summary["lesion_misses"] == 1
    assert summary["whole_pancreas_misses"] == 1
    header = lines[0].split(",")
    last = dict(zip(header, lines[3].split(",")))
    assert last["lesion_miss"] == "1" and float(last["lesion_hd95"]) == pytest.approx(diagonal, abs=1e-4)
    assert dict(zip(header, lines[1].split(",")))["lesion_miss"] == "0"
    assert summary["segmentation"]["lesion_nsd"]["mean"] < 1.0
    assert summary["classification"]["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert summary["classification"]["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert summary["classification"]["declared_subtypes"] == 3
    assert "3 declared subtypes" in summary["conventions"]["classification"]
    assert summary["bootstrap"] == {"resamples": 100, "seed": 0, "interval": 0.95}
    assert "hd95" in summary["conventions"] and evaluation.probabilities.shape == (3, 3)
    if _has_matplotlib():
        for name in ("dice_by_subtype.png", "confusion_matrix.png", "roc_curves.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_mismatched_case_sets_are_an_error_listing_them(tmp_path):
    gt, pred = make_folders(tmp_path)
    (pred / "quiz_003.nii.gz").unlink()
    write_nifti(label_map(), lps_affine(), pred / "quiz_099.nii.gz")
    with pytest.raises(ValueError) as error:
        evaluate({"pred": str(pred), "gt": str(gt), "out": str(tmp_path / "e"), "plots": False, "progress": False})
    assert "missing from the predictions" in str(error.value) and "quiz_003" in str(error.value)
    assert "not in the reference" in str(error.value) and "quiz_099" in str(error.value)
    assert main([f"pred={pred}", f"gt={gt}", f"out={tmp_path / 'e'}", "plots=false", "progress=false"]) == 1
    assert main([f"pred={pred}", "unknown_key=1"]) == 2
    assert main([f"pred={pred}", f"gt={gt}"]) == 2  # out= missing


def test_the_schema_types_the_yaml_and_holds_no_values():
    """EvaluationConfig types conf/evaluate.yaml's keys in its order and has no values of its own; a
    mapping given to evaluate() from Python is read as changes to the YAML file."""
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(config_dir() / "evaluate.yaml")
    python = OmegaConf.structured(EvaluationConfig)
    assert list(yaml) == list(python)
    assert all(OmegaConf.is_missing(python, key) for key in python)
    composed = EvaluationConfig.compose({"pred": "p", "gt": "g", "out": "o", "bootstrap": 7})
    assert composed.bootstrap == 7 and composed.tolerance_mm == yaml.tolerance_mm and composed.probs is None
    assert composed.pred == "p" and composed.wandb_project == yaml.wandb_project


def test_evaluate_command_line_errors(tmp_path, capsys):
    gt, pred = make_folders(tmp_path)
    assert main([f"pred={pred}", f"gt={gt}", f"out={tmp_path / 'e'}", "tolerance_mm=abc"]) == 2
    assert "tolerance_mm" in capsys.readouterr().err
    assert main([f"pred={pred}", f"gt={gt}", f"out={tmp_path / 'e'}", "tolerance=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'tolerance'" in err and "tolerance_mm" in err
    assert main([f"pred={pred}"]) == 2
    err = capsys.readouterr().err
    assert "gt=..." in err and "out=..." in err and "pred=..." not in err
    assert main(["--help"]) == 0
    assert "tolerance_mm: 2.0" in capsys.readouterr().out
    assert not (tmp_path / "e").exists()


def test_probability_columns_must_match_the_declared_subtypes(tmp_path):
    """Macro scores average over num_subtypes, so a probabilities table for another number is an error."""
    gt, pred = make_folders(tmp_path)
    (pred / "subtype_probabilities.csv").write_text(
        "Names,p0,p1\nquiz_001.nii.gz,0.7,0.3\nquiz_002.nii.gz,0.1,0.9\nquiz_003.nii.gz,0.2,0.8\n")
    with pytest.raises(ValueError, match="2 subtype probability columns.*num_subtypes is 3"):
        evaluate({"pred": str(pred), "gt": str(gt), "out": str(tmp_path / "e"), "plots": False, "progress": False})


def test_reference_from_a_dataset_root_and_a_split_folder(tmp_path):
    root = write_distributed_dataset(tmp_path / "quiz", train_per_subtype=1, validation_per_subtype=1, test_cases=0)
    pred = tmp_path / "pred"
    pred.mkdir()
    validation_masks = [p for p in (root / "validation").rglob("*.nii.gz") if not p.name.endswith("_0000.nii.gz")]
    for mask in validation_masks:
        shutil.copy(mask, pred / mask.name)
    subtypes = {p.name[: -len(".nii.gz")]: int(p.parent.name[-1]) for p in validation_masks}
    rows = "".join(f"{case}.nii.gz,{subtype}\n" for case, subtype in subtypes.items())
    (pred / "subtype_results.csv").write_text("Names,Subtype\n" + rows)
    for gt, extra in ((root, {"splits": ["validation"]}), (root / "validation", {})):
        summary = evaluate({"pred": str(pred), "gt": str(gt), "out": str(tmp_path / "e"), "overwrite": True, "plots": False,
                            "progress": False, "bootstrap": 10, **extra}).summary
        assert summary["num_cases"] == 3 and summary["segmentation"]["whole_pancreas_dice"]["mean"] == 1.0
        assert summary["classification"]["macro_f1"] == 1.0 and "macro_auroc" not in summary["classification"]
    with pytest.raises(ValueError, match="missing from the predictions"):  # every labelled case of the root
        evaluate({"pred": str(pred), "gt": str(root), "out": str(tmp_path / "e"), "overwrite": True, "plots": False, "progress": False})
    chosen = sorted(subtypes)[:2]  # cases= scores some reference cases only (holdout: a k-fold split's validation)
    for case in set(subtypes) - set(chosen):
        (pred / f"{case}.nii.gz").unlink()
    (pred / "subtype_results.csv").write_text("Names,Subtype\n" + "".join(f"{c}.nii.gz,{subtypes[c]}\n" for c in chosen))
    summary = evaluate({"pred": str(pred), "gt": str(root), "out": str(tmp_path / "e"), "overwrite": True, "plots": False,
                        "progress": False, "bootstrap": 10, "cases": chosen}).summary
    assert summary["num_cases"] == 2
    with pytest.raises(ValueError, match=r"cases: 1 case\(s\) have no reference in .*: quiz_9_999"):
        evaluate({"pred": str(pred), "gt": str(root), "out": str(tmp_path / "e"), "overwrite": True, "cases": [*chosen, "quiz_9_999"]})


def test_synthetic_test_labels_are_a_reference(tmp_path):
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    config = load_config("tiny")
    config.train_counts, config.validation_counts, config.test_counts = (0, 0, 0), (0, 0, 0), (1, 1, 1)
    root = generate_dataset(tmp_path / "synth", config, progress=False)
    pred = tmp_path / "pred"
    pred.mkdir()
    for mask in (root / "test_labels").glob("*.nii.gz"):
        shutil.copy(mask, pred / mask.name)
    shutil.copy(root / "test_labels" / "subtype_reference.csv", pred / "subtype_results.csv")
    assert main([f"pred={pred}", f"gt={root / 'test_labels'}", f"out={tmp_path / 'e'}", "plots=false",
                 "progress=false", "bootstrap=20", "tolerance_mm=1.5"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["num_cases"] == 3 and summary["segmentation"]["lesion_dice"]["mean"] == 1.0
    assert summary["classification"]["macro_f1"] == 1.0 and summary["inputs"]["tolerance_mm"] == 1.5
