"""Evaluation pictures and error analysis: the reliability diagram's bins, the per-subtype NSD and HD95
plots and the worst-case montage evaluate writes, finding each case's image, lesions missed or
over-segmented, and an evaluation folder read back."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.evaluation.analysis import (
    classification_figures,
    evaluation_case_files,
    load_evaluation,
    metrics_by_subtype,
)
from pancreas_mtl.evaluation.calibration import reliability_bins
from pancreas_mtl.evaluation.case_views import lesion_errors
from pancreas_mtl.evaluation.evaluate import Evaluation, evaluate
from pancreas_mtl.evaluation.plots import metric_by_subtype_figure
from pancreas_mtl.evaluation.references import find_case_files
from tests import notebook_inputs
from tests.conftest import lps_affine

PNG = b"\x89PNG\r\n\x1a\n"


def test_reliability_bins_known_answers():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    targets = np.array([0, 1, 1, 0])  # right, wrong, right, wrong
    result = reliability_bins(probabilities, targets, bins=5)
    assert result["counts"].tolist() == [0, 0, 1, 2, 1]  # bins are closed on the right: 0.8 in (0.6, 0.8]
    assert result["accuracy"][3] == 0.5 and result["confidence"][3] == pytest.approx(0.75)
    expected = (abs(0.0 - 0.55) + 2 * abs(0.5 - 0.75) + abs(1.0 - 0.9)) / 4
    assert result["ece"] == pytest.approx(expected) and np.isnan(result["accuracy"][0])
    assert reliability_bins(np.eye(3), np.arange(3), 10)["ece"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        reliability_bins(np.ones(3), np.zeros(3))


def _row(case, subtype, dice, hd95=1.0, miss=0):
    return {"case_id": case, "subtype": subtype, "lesion_dice": dice, "lesion_hd95": hd95, "lesion_miss": miss,
            "whole_pancreas_dice": 1.0, "whole_pancreas_hd95": 0.5, "whole_pancreas_miss": 0,
            "lesion_nsd": dice, "whole_pancreas_nsd": 1.0}


def test_metrics_by_subtype_and_its_figure():
    """(The worst cases and the slice shown: tests/test_selection.py.)"""
    rows = [_row("a", 0, 0.9, 2.0), _row("b", 1, 0.1, 50.0, 1), _row("c", 2, float("nan"), 9.0), _row("d", 0, 0.5, 3.0)]
    table = metrics_by_subtype(rows, ["lesion_dice"])
    assert table.column("subtype") == [0, 1, 2, "all"] and table.column("lesion misses") == [0, 1, 0, 1]
    assert table[0]["lesion_dice mean"] == pytest.approx(0.7) and table[2]["lesion_dice mean"] is None
    figure = metric_by_subtype_figure(rows, "hd95")
    assert [axis.get_title() for axis in figure.axes] == ["whole pancreas HD95 (mm)", "lesion HD95 (mm)"]
    with pytest.raises(ValueError, match="unknown metric kind"):
        metric_by_subtype_figure(rows, "iou")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluated")
    dataset = notebook_inputs.tiny_dataset(root / "data", train=(0, 0, 0), validation=(2, 1, 1), test=(1, 1, 0))
    predictions = notebook_inputs.predictions(dataset, root / "pred")
    return dataset, predictions, notebook_inputs.evaluation(dataset, predictions, root / "eval")


def test_evaluate_writes_every_picture(evaluated):
    _, _, out = evaluated
    for name in ("dice_by_subtype", "nsd_by_subtype", "hd95_by_subtype", "confusion_matrix", "roc_curves",
                 "reliability", "worst_cases"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name


def test_an_evaluation_folder_read_back(evaluated, tmp_path):
    dataset, predictions, out = evaluated
    evaluation = load_evaluation(out)
    assert len(evaluation.rows) == 4 and evaluation.probabilities.shape == (4, 3)
    assert isinstance(evaluation.rows[0]["subtype"], int) and isinstance(evaluation.rows[0]["lesion_dice"], float)
    assert [r["lesion_miss"] for r in evaluation.rows] == [0, 0, 1, 0]
    assert len(classification_figures(evaluation)) == 3
    assert classification_figures(Evaluation(evaluation.rows, {}, None)) == []
    files = evaluation_case_files(evaluation)
    assert all(f.image is not None and f.image.name == f"{case}_0000.nii.gz" for case, f in files.items())
    errors = {row["case_id"]: row for row in lesion_errors(evaluation.rows, files)}
    kinds = [errors[row["case_id"]]["error"] for row in evaluation.rows]
    assert kinds[:3] == ["ok", "over-segmented", "missed"]  # notebook_inputs: exact, dilated, removed, shifted
    assert lesion_errors(evaluation.rows, files).rows[0]["error"] != "ok"
    (tmp_path / "partial").mkdir()
    shutil.copy(out / "per_case.csv", tmp_path / "partial" / "per_case.csv")
    with pytest.raises(FileNotFoundError, match="summary.json is missing"):
        load_evaluation(tmp_path / "partial")


def test_images_are_found_beside_masks_in_the_layout_or_not_at_all(evaluated, tmp_path):
    dataset, _, _ = evaluated
    test_labels = dataset / "test_labels"
    pred = tmp_path / "pred"
    shutil.copytree(test_labels, pred, ignore=shutil.ignore_patterns("*.json", "*.csv"))
    files = find_case_files(pred, test_labels)  # images in test/, the dataset test_labels/ lies in
    assert files and all(f.image is not None and f.image.parent.name == "test" for f in files.values())
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    write_nifti(np.zeros((4, 5, 6), np.uint8), lps_affine(), lonely / "case_1.nii.gz")
    assert find_case_files(lonely, lonely)["case_1"].image is None
    with pytest.raises(ValueError, match="no predicted mask for 1 case"):
        find_case_files(tmp_path, lonely)
    with pytest.raises(ValueError, match="no reference mask"):
        find_case_files(lonely, lonely, cases=["case_2"])


def test_no_montage_when_turned_off(evaluated, tmp_path):
    dataset, predictions, _ = evaluated
    evaluate({"pred": str(predictions), "gt": str(dataset), "splits": ["validation"], "out": str(tmp_path),
              "bootstrap": 0, "progress": False, "montage_cases": 0})
    assert (tmp_path / "reliability.png").is_file() and not (tmp_path / "worst_cases.png").exists()
