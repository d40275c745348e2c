"""Case-level metrics against hand-computed values: Dice, surface Dice, F1, balanced accuracy, AUROC."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pancreas_mtl.evaluation.metrics import (
    ClassificationMetrics,
    accuracy,
    balanced_accuracy,
    binary_auroc,
    confusion_matrix,
    dice,
    lesion_dice,
    macro_auroc,
    macro_f1,
    normalised_surface_dice,
    per_class_auroc,
    per_class_f1,
    per_class_recall,
    segmentation_metrics,
    whole_pancreas_dice,
)


def cube(shape, start, size=4) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --- segmentation -----------------------------------------------------------------------------------

def test_dice_of_two_overlapping_cubes():
    a = cube((10, 10, 10), (0, 0, 0))
    b = cube((10, 10, 10), (2, 0, 0))  # overlap 2 x 4 x 4 = 32 of 64 + 64 voxels
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, cube((10, 10, 10), (5, 5, 5))) == 0.0
    assert dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(0.5)


def test_dice_empty_conventions():
    empty, full = np.zeros((3, 3, 3), bool), np.ones((3, 3, 3), bool)
    assert dice(empty, empty) == 1.0
    assert math.isnan(dice(empty, empty, empty_value=float("nan")))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(empty, np.zeros((3, 3, 4), bool))


def test_whole_pancreas_and_lesion_dice_on_label_maps():
    true = np.zeros((1, 1, 8), dtype=np.uint8)
    true[0, 0] = [0, 1, 1, 1, 2, 2, 0, 0]
    pred = np.zeros_like(true)
    pred[0, 0] = [0, 1, 2, 1, 2, 1, 1, 0]
    # whole pancreas: true > 0 at {1..5}, pred > 0 at {1..6} -> 2 * 5 / 11
    assert whole_pancreas_dice(pred, true) == pytest.approx(10 / 11)
    # lesion: true {4, 5}, pred {2, 4} -> 2 * 1 / 4
    assert lesion_dice(pred, true) == pytest.approx(0.5)
    no_lesion = np.where(true == 2, 1, true)
    assert lesion_dice(no_lesion, no_lesion) == 1.0
    scores = segmentation_metrics(pred, true)
    assert scores == pytest.approx({"whole_pancreas_dice": 10 / 11, "lesion_dice": 0.5})


def test_normalised_surface_dice_of_separated_cubes():
    # two 4^3 cubes side by side along x (last axis), x = 1..4 and x = 6..9: 56 border voxels each;
    # facing faces (16 voxels each) are 2 voxels apart, the next layers (rings of 12) 3 apart, ...
    a = cube((8, 8, 12), (2, 2, 1))
    b = cube((8, 8, 12), (2, 2, 6))
    assert normalised_surface_dice(a, b, (1.0, 1.0, 1.0), tolerance_mm=1.9) == 0.0
    assert normalised_surface_dice(a, b, (1.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(32 / 112)
    assert normalised_surface_dice(a, b, (1.0, 1.0, 1.0), tolerance_mm=3.0) == pytest.approx(56 / 112)
    # spacing is in the masks' axis order (z, y, x): 2 mm along x doubles the distances
    assert normalised_surface_dice(a, b, (1.0, 1.0, 2.0), tolerance_mm=4.0) == pytest.approx(32 / 112)
    assert normalised_surface_dice(a, b, (2.0, 2.0, 1.0), tolerance_mm=2.0) == pytest.approx(32 / 112)
    assert normalised_surface_dice(a, a, (1.0, 1.0, 1.0), tolerance_mm=0.0) == 1.0
    empty = np.zeros_like(a)
    assert normalised_surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert normalised_surface_dice(a, empty, (1, 1, 1)) == 0.0
    labels_a, labels_b = a.astype(np.uint8) * 2, b.astype(np.uint8) * 2
    scores = segmentation_metrics(labels_a, labels_b, spacing=(1.0, 1.0, 1.0), tolerance_mm=2.0)
    assert scores["lesion_nsd"] == pytest.approx(32 / 112) and scores["whole_pancreas_nsd"] == pytest.approx(32 / 112)


# --- classification ---------------------------------------------------------------------------------

TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
PREDICTIONS = [0, 0, 1, 1, 1, 2, 2, 2, 0, 1]


def test_confusion_matrix_rows_are_true_classes():
    expected = np.array([[2, 1, 0], [0, 2, 0], [1, 1, 3]])
    assert np.array_equal(confusion_matrix(TARGETS, PREDICTIONS), expected)
    assert confusion_matrix([0, 1], [1, 1], num_classes=3).shape == (3, 3)


def test_f1_balanced_accuracy_accuracy_hand_values():
    # F1: class 0: 2 TP, 1 FP, 1 FN -> 4/6; class 1: 2 TP, 2 FP -> 4/6; class 2: 3 TP, 2 FN -> 6/8
    assert per_class_f1(TARGETS, PREDICTIONS) == pytest.approx([2 / 3, 2 / 3, 3 / 4])
    assert macro_f1(TARGETS, PREDICTIONS) == pytest.approx(25 / 36)
    assert per_class_recall(TARGETS, PREDICTIONS) == pytest.approx([2 / 3, 1.0, 3 / 5])
    assert balanced_accuracy(TARGETS, PREDICTIONS) == pytest.approx(34 / 45)
    assert accuracy(TARGETS, PREDICTIONS) == pytest.approx(0.7)
    assert macro_f1(torch.tensor(TARGETS), torch.tensor(PREDICTIONS)) == pytest.approx(25 / 36)


def test_majority_collapse_scores():
    targets = [0, 0, 1, 1, 1, 1, 2, 2, 2]
    everything_one = [1] * 9
    # F1 of class 1 = 2 * 4 / (8 + 5) = 8/13, classes 0 and 2 have F1 0
    assert macro_f1(targets, everything_one) == pytest.approx((8 / 13) / 3)
    assert balanced_accuracy(targets, everything_one) == pytest.approx(1 / 3)


def test_macro_f1_averages_over_declared_classes():
    """The issue's toy case: subtype 2 is in neither targets nor predictions. Averaging over the classes
    present gives 0.733, over the 3 declared subtypes 0.489 (scikit-learn's labels=range(3), zero_division=0)."""
    targets, predictions = [0, 0, 0, 1], [0, 0, 1, 1]  # F1: class 0 4/5, class 1 2/3, class 2 undefined
    f1 = per_class_f1(targets, predictions, num_classes=3)
    assert f1[:2] == pytest.approx([4 / 5, 2 / 3]) and math.isnan(f1[2])  # per class: undefined, not 0
    assert macro_f1(targets, predictions, num_classes=3) == pytest.approx((4 / 5 + 2 / 3 + 0) / 3)  # 0.489
    assert macro_f1(targets, predictions, num_classes=3, zero_division=float("nan")) == pytest.approx(11 / 15)
    assert macro_f1(targets, predictions, num_classes=3, zero_division=1.0) == pytest.approx((4 / 5 + 2 / 3 + 1) / 3)
    assert macro_f1(targets, predictions) == pytest.approx(11 / 15)  # declared: 0..largest class seen
    assert macro_f1([0, 0, 1], [0, 1, 1], num_classes=3) == pytest.approx(4 / 9)
    assert math.isnan(macro_f1([], [], num_classes=3))  # no cases: undefined, not 0
    accumulator = ClassificationMetrics(num_classes=3)  # the validation metric uses the same definition
    accumulator.update(np.eye(3)[predictions], targets)
    assert accumulator.compute()["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 3)
    assert math.isnan(accumulator.compute()["f1_2"])


def test_classes_absent_from_targets_and_predictions():
    # a class only predicted counts in F1 (0) but not in balanced accuracy
    assert macro_f1([0, 0], [0, 2]) == pytest.approx((2 / 3 + 0.0 + 0.0) / 3)  # class 1: in neither
    assert macro_f1([0, 0], [0, 2], zero_division=float("nan")) == pytest.approx((2 / 3 + 0.0) / 2)
    assert balanced_accuracy([0, 0], [0, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown"):
        macro_f1([-1, 0], [0, 0])


def test_scores_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 40)
    probabilities = rng.dirichlet(np.ones(3), 40)
    probabilities[np.arange(40), targets] += rng.uniform(0, 0.5, 40)  # some signal
    probabilities = np.round(probabilities, 1)  # ties
    predictions = probabilities.argmax(1)
    assert macro_f1(targets, predictions, 3) == pytest.approx(
        metrics.f1_score(targets, predictions, labels=[0, 1, 2], average="macro", zero_division=0))
    assert balanced_accuracy(targets, predictions) == pytest.approx(metrics.balanced_accuracy_score(targets, predictions))
    assert np.array_equal(confusion_matrix(targets, predictions), metrics.confusion_matrix(targets, predictions))
    for k in range(3):
        assert per_class_auroc(probabilities, targets)[k] == pytest.approx(
            metrics.roc_auc_score(targets == k, probabilities[:, k]))


def test_auroc_hand_values():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4
    assert binary_auroc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert math.isnan(binary_auroc([0.1, 0.2], [True, True]))  # no negatives
    probabilities = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    targets = [0, 0, 1, 1]
    auroc = per_class_auroc(probabilities, targets)
    # class 0: positives 0.8, 0.6 vs negatives 0.2, 0.5 -> 4/4; class 1: 0.7, 0.4 vs 0.1, 0.3 -> 4/4
    assert auroc[:2] == pytest.approx([1.0, 1.0])
    assert math.isnan(auroc[2])  # class 2 absent from targets
    assert macro_auroc(probabilities, targets) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="targets must be"):
        per_class_auroc(probabilities, [0, 0, 1, 3])


def test_classification_metrics_accumulates_and_drops_unknown():
    accumulator = ClassificationMetrics(num_classes=3)
    eye = np.eye(3)
    accumulator.update(eye[PREDICTIONS[:4]], TARGETS[:4])
    accumulator.update(torch.tensor(eye[PREDICTIONS[4:]]), torch.tensor(TARGETS[4:]))
    accumulator.update(eye[[1]], [-1])  # unknown subtype: ignored
    accumulator.update(eye[2], 2)       # one case as (K,) and a scalar target
    assert len(accumulator) == 11
    scores = accumulator.compute()
    targets, predictions = TARGETS + [2], PREDICTIONS + [2]
    assert scores["macro_f1"] == pytest.approx(macro_f1(targets, predictions))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy(targets, predictions))
    assert scores["accuracy"] == pytest.approx(8 / 11)
    assert scores["num_cases"] == 11
    assert scores["recall_2"] == pytest.approx(4 / 6)
    assert np.array_equal(accumulator.confusion_matrix(), confusion_matrix(targets, predictions, 3))
    accumulator.reset()
    assert len(accumulator) == 0 and math.isnan(accumulator.compute()["macro_f1"])


@pytest.mark.parametrize("seed", range(6))
def test_rules_for_absent_classes_match_scikit_learn(seed):
    """The rules torchmetrics breaks (evaluation/metrics.py docstring), against scikit-learn: classes only
    in the targets, only predicted, or in neither. Per-class F1 and recall NaN where 0/0 (sklearn's
    zero_division=NaN), balanced accuracy over the classes in the targets, AUROC NaN for a class absent
    from the targets and the macro the mean of the others."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    num_classes, labels = 5, list(range(5))
    in_targets = rng.choice(num_classes, size=2 + seed % 2, replace=False)
    predicted = rng.choice(num_classes, size=3, replace=False)  # overlaps in_targets in some seeds only
    targets, predictions = rng.choice(in_targets, 30), rng.choice(predicted, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        expected_balanced = metrics.balanced_accuracy_score(targets, predictions)
    assert balanced_accuracy(targets, predictions, num_classes) == pytest.approx(expected_balanced, abs=1e-12)
    np.testing.assert_allclose(per_class_f1(targets, predictions, num_classes), metrics.f1_score(
        targets, predictions, labels=labels, average=None, zero_division=np.nan), atol=1e-12)
    np.testing.assert_allclose(per_class_recall(targets, predictions, num_classes), metrics.recall_score(
        targets, predictions, labels=labels, average=None, zero_division=np.nan), atol=1e-12)
    assert np.array_equal(confusion_matrix(targets, predictions, num_classes),
                          metrics.confusion_matrix(targets, predictions, labels=labels))
    probabilities = np.round(rng.dirichlet(np.ones(num_classes), 30), 1)  # in [0, 1], with ties
    auroc = per_class_auroc(probabilities, targets)
    expected = [metrics.roc_auc_score(targets == k, probabilities[:, k]) if k in in_targets else np.nan
                for k in labels]
    np.testing.assert_allclose(auroc, expected, atol=1e-12)
    assert macro_auroc(probabilities, targets) == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_validation_tensors_and_evaluation_arrays_give_identical_scores():
    """Validation scores float32 tensors through the accumulator (unknown subtypes among them), the
    evaluation numpy arrays through classification_scores: the same cases give the same numbers, bit for bit."""
    from pancreas_mtl.evaluation.metrics import classification_scores

    rng = np.random.default_rng(3)
    targets = rng.choice([-1, 0, 1], 24)  # subtype 2 declared, never seen
    logits = rng.normal(size=(24, 3)) - [0, 0, 4]  # subtype 2 is never predicted either
    probabilities = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    accumulator = ClassificationMetrics(num_classes=3)
    accumulator.update(probabilities[:10], torch.from_numpy(targets[:10]))
    accumulator.update(probabilities[10:], torch.from_numpy(targets[10:]))
    scores = accumulator.compute()
    known = targets != -1
    arrays = probabilities.numpy().astype(np.float64)[known]
    expected = classification_scores(targets[known], arrays.argmax(1), arrays, num_subtypes=3)
    assert scores.pop("num_cases") == known.sum()
    assert scores.keys() == expected.keys()
    assert all(scores[name] == expected[name] or (math.isnan(scores[name]) and math.isnan(expected[name]))
               for name in expected), {name: (scores[name], expected[name]) for name in expected}
    assert math.isnan(scores["f1_2"]) and math.isnan(scores["auroc_2"]) and math.isnan(scores["recall_2"])
