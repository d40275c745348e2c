"""One rule each for what pictures of cases show, on small hand-made arrays: the worst cases, the axial
slice of a case, the one-vs-rest ROC curves; and that training's validation pictures, the evaluation's
figures and the W&B charts use them (the same case shows the same slice, the same cases are the worst)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pancreas_mtl.evaluation.case_views import worst_cases_figure
from pancreas_mtl.evaluation.plots import roc_figure
from pancreas_mtl.evaluation.references import CaseFiles
from pancreas_mtl.evaluation.roc import roc_curve, subtype_roc_curves
from pancreas_mtl.evaluation.selection import shown_slice, worst_cases
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.tracking import command_runs, media
from pancreas_mtl.training.validation_media import validation_slice
from tests.conftest import lps_affine

LABELS = {"background": 0, "pancreas": 1, "lesion": 2}


# --- the worst cases --------------------------------------------------------------------------------------

def _row(case, lesion_dice, lesion_hd95=1.0, whole_pancreas_dice=1.0):
    return {"case_id": case, "subtype": 0, "lesion_dice": lesion_dice, "lesion_hd95": lesion_hd95,
            "whole_pancreas_dice": whole_pancreas_dice}


def test_worst_cases_lowest_first_highest_for_hd95_undefined_last_ties_by_case():
    rows = [_row("a", 0.9, 2.0), _row("b", 0.1, 50.0), _row("c", float("nan"), 9.0), _row("d", 0.5, None),
            _row("e", 0.5, 3.0)]
    assert [r["case_id"] for r in worst_cases(rows, "lesion_dice", 5)] == ["b", "d", "e", "a", "c"]
    assert [r["case_id"] for r in worst_cases(rows, "lesion_hd95", 5)] == ["b", "c", "e", "a", "d"]
    assert [r["case_id"] for r in worst_cases(list(reversed(rows)), "lesion_dice", 3)] == ["b", "d", "e"]
    assert [r["case_id"] for r in worst_cases(rows, "lesion_nsd", 2)] == ["a", "b"]  # absent everywhere: by case
    assert worst_cases(rows, "lesion_dice", 0) == [] and worst_cases(rows, "lesion_dice", -1) == []
    # training's values may be numpy or torch scalars
    scalars = [_row("x", np.float32(0.7)), _row("y", torch.tensor(0.2)), _row("z", np.float64(np.nan))]
    assert [r["case_id"] for r in worst_cases(scalars, "lesion_dice", 3)] == ["y", "x", "z"]


def test_wandb_worst_cases_follow_the_evaluation_rule_lowest_lesion_dice():
    """The pancreas Dice does not count: case_b has the lower mean of the two Dice scores, case_a the
    lower lesion Dice, as in the evaluation's worst_cases.png."""
    true = np.zeros((4, 6, 6), np.uint8)
    true[1:3, 1:5, 1:5], true[2, 2:4, 2:4] = 1, 2
    cases = [{**_row("case_a", 0.3, whole_pancreas_dice=0.95), "probabilities": None,
              "slice": validation_slice(np.zeros(true.shape, np.float32), true, true)},
             {**_row("case_b", 0.4, whole_pancreas_dice=0.1), "probabilities": None,
              "slice": validation_slice(np.zeros(true.shape, np.float32), true, true)},
             {**_row("case_c", 0.0), "probabilities": None, "slice": None}]  # no slice kept: not shown

    class Run:
        def log(self, payload):
            self.payload = payload

    run = Run()
    media.log_validation_media(run, cases, step=3, epoch=1, labels=LABELS, num_worst=1)
    [image] = run.payload[media.WORST_KEY]
    assert image._caption.startswith("case_a ")
    assert [c["case_id"] for c in worst_cases(cases[:2], "lesion_dice", 1)] == ["case_a"]


# --- the slice shown --------------------------------------------------------------------------------------

def test_shown_slice_reference_lesion_then_predicted_lesion_then_foregrounds_then_middle():
    truth, pred = np.zeros((7, 4, 4), np.uint8), np.zeros((7, 4, 4), np.uint8)
    assert shown_slice(truth, pred) == 3  # nothing anywhere: the middle
    pred[5, :3] = 1
    assert shown_slice(truth, pred) == 5  # predicted foreground only
    truth[1, :1] = 1
    assert shown_slice(truth, pred) == 1  # the reference's foreground before the (larger) predicted one
    pred[4, 0, 0] = 2
    assert shown_slice(truth, pred) == 4  # a predicted lesion before any foreground
    truth[2, 0, :2], truth[6, :2, :2] = 2, 2
    assert shown_slice(truth, pred) == 6  # the reference lesion's largest slice
    truth[0, :2, :2] = 2
    assert shown_slice(truth, pred) == 0  # tied: the first
    assert shown_slice(truth, pred, lesion_label=1) == 1
    with pytest.raises(ValueError, match=r"shape \(z, y, x\)"):
        shown_slice(truth, pred[:3])


def test_the_validation_overlay_and_the_evaluation_figure_show_the_same_slice(tmp_path):
    """A case with no reference lesion and a predicted one: both show the predicted lesion's slice (z 4),
    not the reference pancreas's largest slice (z 1), which training once showed."""
    truth = np.zeros((6, 10, 12), np.uint8)
    truth[1, 2:9, 2:10], truth[2:5, 4:6, 4:6] = 1, 1
    pred = truth.copy()
    pred[4, 4:6, 4:6] = 2
    image = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)

    assert validation_slice(torch.from_numpy(image), truth, pred)["z"] == 4

    for name, array in (("truth", truth), ("pred", pred), ("image", image)):
        write_nifti(array, lps_affine(), tmp_path / f"{name}.nii.gz")
    files = {"case": CaseFiles("case", tmp_path / "image.nii.gz", tmp_path / "truth.nii.gz", tmp_path / "pred.nii.gz")}
    figure = worst_cases_figure([{"case_id": "case", "subtype": 0, "lesion_dice": 0.0}], files)
    assert figure.axes[0].get_title() == "case (subtype 0), z 4"


# --- ROC curves ----------------------------------------------------------------------------------------------

def test_roc_curve_ties_are_one_point():
    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([True, False, True, False]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_subtype_roc_curves_one_vs_rest_over_the_known_subtypes():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    subtypes = [0, 1, 0, 1, None]  # the last case has no reference subtype: left out
    curves = subtype_roc_curves(probabilities, subtypes)
    assert list(curves) == [0, 1]  # subtype 2: no positives, no curve
    fpr, tpr = curves[0]  # scores 0.7, 0.2, 0.4, 0.1 for positives 1, 0, 1, 0
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1, 1])
    fpr, tpr = curves[1]  # scores 0.2, 0.6, 0.5, 0.1 for positives 0, 1, 0, 1
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 0.5, 1])
    assert subtype_roc_curves(probabilities, [1, 1, 1, 1, None]) == {}  # no negatives
    assert subtype_roc_curves(probabilities, [None] * 5) == {}
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        subtype_roc_curves(probabilities, subtypes[:3])


def test_the_png_and_both_wandb_charts_draw_the_same_curves():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]])
    subtypes = [0, 1, 2, 1]
    expected = {f"subtype{k}": curve for k, curve in subtype_roc_curves(probabilities, subtypes).items()}
    rows = [{"case_id": f"c{i}", "subtype": s} for i, s in enumerate(subtypes)]
    validation = [{"subtype": s, "probabilities": torch.tensor(p)} for s, p in zip(subtypes, probabilities)]
    validation.append({"subtype": 0, "probabilities": None})  # a network without a head: left out
    lines = {line.get_label().split(" (")[0].replace(" ", ""): (line.get_xdata(), line.get_ydata())
             for line in roc_figure(rows, probabilities).axes[0].get_lines() if line.get_label().startswith("subtype")}
    for curves in (command_runs.roc_curves(rows, probabilities), media.roc_curves(validation), lines):
        assert list(curves) == list(expected) == ["subtype0", "subtype1", "subtype2"]
        for name, (fpr, tpr) in expected.items():
            np.testing.assert_allclose(curves[name][0], fpr)
            np.testing.assert_allclose(curves[name][1], tpr)
