"""Case-level metrics: Dice of whole pancreas and lesion, surface Dice, and subtype classification scores.

Plain functions on whole cases (not patches), taking numpy arrays or torch tensors (moved to the CPU).
Label maps use 0 background, 1 pancreas, 2 lesion; masks are anything that converts to bool.

Conventions, stated once:

- Dice when both masks are empty is ``empty_value`` (default 1.0: predicting no lesion where there is
  none is right). Metrics Reloaded calls this case undefined; pass ``empty_value=float("nan")`` for
  nnU-Net's convention (NaN, left out of the mean). Only one mask empty gives 0.0.
- A *miss* is a case where exactly one of prediction and reference is empty (a missed or a spurious
  structure). It scores the worst value of every metric, so that misses pull means down rather than
  drop out of them: Dice 0, NSD 0, HD95 the image diagonal (:func:`image_diagonal_mm`, Metrics
  Reloaded's recommendation). Both empty is a correct "nothing there": Dice 1, NSD 1, HD95 0.
  MONAI returns NaN in all of these cases; where both masks are non-empty our Dice, HD95 and NSD equal
  MONAI's (tests/test_metric_parity.py).
- Classification targets are subtypes 0..K-1; unknown subtypes (-1) must be filtered out first
  (:class:`ClassificationMetrics` does this). Macro F1 averages over the K declared classes (the
  dataset's subtypes, ``num_classes``), not only those that occur: a class in neither targets nor
  predictions scores ``zero_division`` (0, as scikit-learn's ``f1_score(labels=range(K),
  zero_division=0)``). Balanced accuracy is the mean recall over the classes present in the targets
  (scikit-learn's), and one-vs-rest AUROC is NaN for a class that is absent from the targets (or is
  every target); macro AUROC averages the defined ones.

Why not torchmetrics (Lightning installs it; we do not declare it): its 1.9 classification functions
break these rules, measured against scikit-learn. ``multiclass_f1_score(average="macro")`` leaves a
class in neither targets nor predictions out of the mean whatever ``zero_division`` says (0.733, not
0.489, on the toy case of tests/test_metrics.py), and gives undefined per-class F1 and recall as 0, not
NaN. Macro ``multiclass_recall`` counts a class that is only predicted as recall 0 (0.25 instead of
balanced accuracy 0.5 for targets [0, 0], predictions [0, 2]). ``multiclass_auroc`` scores a class absent
from the targets 0 with a warning and averages it in (macro 0.667 instead of 1.0), and softmaxes rows
with scores above 1. Results are float32, and an empty set of cases raises instead of giving NaN. A
wrapper would rebuild every rule from its counts, and its DDP sync (``dist_reduce_fx="cat"``) would
count the cases that the distributed sampler repeats twice, which ``MultiTaskModule._gathered`` drops
by case id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata

from pancreas_mtl.planning.plan import LESION_LABEL

PANCREAS_LABEL = 1
UNKNOWN_SUBTYPE = -1


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (a score name as summaries and logs spell it) is better: the
    HD95 distances; every other score here is higher-better."""
    return metric.endswith("_hd95")


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _same_shape(pred: np.ndarray, true: np.ndarray, what: str) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"{what}: prediction shape {pred.shape} differs from reference shape {true.shape}")


# --- segmentation -----------------------------------------------------------------------------------

def dice(pred_mask, true_mask, empty_value: float = 1.0) -> float:
    """Dice 2|P & T| / (|P| + |T|) of two binary masks of the same shape; ``empty_value`` if both are empty."""
    pred = _as_numpy(pred_mask).astype(bool, copy=False)
    true = _as_numpy(true_mask).astype(bool, copy=False)
    _same_shape(pred, true, "dice")
    total = np.count_nonzero(pred) + np.count_nonzero(true)
    if total == 0:
        return float(empty_value)
    return 2.0 * np.count_nonzero(pred & true) / total


def whole_pancreas_dice(pred_labels, true_labels, empty_value: float = 1.0) -> float:
    """Dice of the whole pancreas: labels 1 and 2 together (label > 0) in both label maps."""
    return dice(_as_numpy(pred_labels) > 0, _as_numpy(true_labels) > 0, empty_value)


def lesion_dice(pred_labels, true_labels, lesion_label: int = LESION_LABEL, empty_value: float = 1.0) -> float:
    """Dice of the lesion (label 2) in two label maps."""
    return dice(_as_numpy(pred_labels) == lesion_label, _as_numpy(true_labels) == lesion_label, empty_value)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image's extent in mm, ``sqrt(sum((n_i * s_i)^2))`` with ``spacing`` in the axis order
    of ``shape``: the worst-case distance scored for a miss. It exceeds the distance between any two
    voxel centres, so a miss always scores worse than the worst hit."""
    if len(shape) != len(spacing):
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {len(shape)}-D shape "
                         f"{tuple(shape)}")
    return float(np.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def is_miss(pred_mask, true_mask) -> bool:
    """True when exactly one of the two masks is empty: a missed or a spurious structure."""
    return bool(_as_numpy(pred_mask).any()) != bool(_as_numpy(true_mask).any())


def _border(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the volume's edge counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def normalised_surface_dice(pred_mask, true_mask, spacing: Sequence[float], tolerance_mm: float = 2.0,
                            empty_value: float = 1.0) -> float:
    """Normalised surface Dice (NSD) at ``tolerance_mm``: the share of both borders lying within the
    tolerance of the other border.

    Border voxels are mask voxels with a face neighbour outside; distances are between voxel centres in
    mm, with ``spacing`` in the masks' axis order ((z, y, x) for our tensors). This counts voxels rather
    than weighting surface elements by area (DeepMind's ``surface-distance``), so numbers differ from that
    package's by a little on coarse grids. Both masks empty gives ``empty_value``, only one 0.0.
    """
    pred = _as_numpy(pred_mask).astype(bool, copy=False)
    true = _as_numpy(true_mask).astype(bool, copy=False)
    _same_shape(pred, true, "normalised_surface_dice")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for {pred.ndim}-D masks")
    pred_any, true_any = pred.any(), true.any()
    if not pred_any and not true_any:
        return float(empty_value)
    if not pred_any or not true_any:
        return 0.0
    # work in the joint bounding box, grown by the tolerance: distances within it are all that matter,
    # and a whole case is much larger than the pancreas
    coords = np.argwhere(pred | true)
    margin = [int(np.ceil(tolerance_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(lo - m, 0), hi + m + 1) for lo, hi, m in zip(coords.min(0), coords.max(0), margin))
    pred_border, true_border = _border(pred[box]), _border(true[box])
    to_true = ndimage.distance_transform_edt(~true_border, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    within = (np.count_nonzero(to_true[pred_border] <= tolerance_mm)
              + np.count_nonzero(to_pred[true_border] <= tolerance_mm))
    return within / (np.count_nonzero(pred_border) + np.count_nonzero(true_border))


def hausdorff_distance_95(pred_mask, true_mask, spacing: Sequence[float],
                          miss_value: float | None = None) -> float:
    """HD95 in mm between two boolean masks with ``spacing`` in their axis order: the larger of the two
    directed 95th percentiles of distances from one border's voxels to the other border (scipy's exact
    Euclidean distance transform; Metrics Reloaded, MONAI).

    0 when both are empty. When only one is (a miss): ``miss_value``, by default the image diagonal
    (:func:`image_diagonal_mm`), the worst case; ``float("nan")`` gives MONAI's "undefined".
    """
    pred = _as_numpy(pred_mask).astype(bool, copy=False)
    true = _as_numpy(true_mask).astype(bool, copy=False)
    _same_shape(pred, true, "hausdorff_distance_95")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for {pred.ndim}-D masks")
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return image_diagonal_mm(pred.shape, spacing) if miss_value is None else float(miss_value)
    coords = np.argwhere(pred | true)  # every border voxel lies in this box: distances within it are exact
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(coords.min(0), coords.max(0)))
    pred_border, true_border = _border(pred[box]), _border(true[box])
    to_true = ndimage.distance_transform_edt(~true_border, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    return float(max(np.percentile(to_true[pred_border], 95), np.percentile(to_pred[true_border], 95)))


def segmentation_metrics(pred_labels, true_labels, spacing: Sequence[float] | None = None,
                         tolerance_mm: float = 2.0) -> dict[str, float]:
    """Whole-pancreas and lesion Dice of one case; with ``spacing``, also their surface Dice
    (``*_nsd``), HD95 (``*_hd95``, the image diagonal for a miss) and ``*_miss`` (1 where exactly one of
    prediction and reference is empty, so the surface scores are the worst-case stand-ins, else 0)."""
    pred, true = _as_numpy(pred_labels), _as_numpy(true_labels)
    _same_shape(pred, true, "segmentation_metrics")
    scores = {"whole_pancreas_dice": whole_pancreas_dice(pred, true), "lesion_dice": lesion_dice(pred, true)}
    if spacing is not None:
        for name, p, t in (("whole_pancreas", pred > 0, true > 0), ("lesion", pred == LESION_LABEL, true == LESION_LABEL)):
            scores[f"{name}_nsd"] = normalised_surface_dice(p, t, spacing, tolerance_mm)
            scores[f"{name}_hd95"] = hausdorff_distance_95(p, t, spacing)
            scores[f"{name}_miss"] = int(is_miss(p, t))
    return scores


# --- classification ---------------------------------------------------------------------------------

def _class_vectors(targets, predictions, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    y_true = _as_numpy(targets).astype(np.int64).reshape(-1)
    y_pred = _as_numpy(predictions).astype(np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} targets but {y_pred.size} predictions")
    if y_true.size and min(y_true.min(), y_pred.min()) < 0:
        raise ValueError("targets and predictions must be classes 0..K-1; filter unknown subtypes (-1) first")
    largest = int(max(y_true.max(), y_pred.max())) + 1 if y_true.size else 0
    if num_classes is None:
        num_classes = largest
    elif largest > num_classes:
        raise ValueError(f"class {largest - 1} found but num_classes is {num_classes}")
    return y_true, y_pred, int(num_classes)


def confusion_matrix(targets, predictions, num_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    y_true, y_pred, k = _class_vectors(targets, predictions, num_classes)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def per_class_f1(targets, predictions, num_classes: int | None = None) -> np.ndarray:
    """(K,) F1 = 2 TP / (2 TP + FP + FN) per class; NaN for a class in neither targets nor predictions."""
    matrix = confusion_matrix(targets, predictions, num_classes).astype(np.float64)
    tp = np.diag(matrix)
    denominator = matrix.sum(0) + matrix.sum(1)  # 2 TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def per_class_recall(targets, predictions, num_classes: int | None = None) -> np.ndarray:
    """(K,) recall (sensitivity) per class; NaN for a class absent from the targets."""
    matrix = confusion_matrix(targets, predictions, num_classes).astype(np.float64)
    support = matrix.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / support, np.nan)


def finite_mean(values) -> float:
    """Mean of the finite values; NaN when there is none (undefined scores are left out, not zero)."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if defined.size else float("nan")


def macro_f1(targets, predictions, num_classes: int | None = None, zero_division: float = 0.0) -> float:
    """Unweighted mean of per-class F1 over the declared classes 0..K-1.

    Args:
        num_classes: K, the dataset's declared subtypes; None takes 0..the largest class seen, so pass it
            whenever a subtype may be missing from an evaluated set.
        zero_division: the F1 of a class in neither targets nor predictions (0/0). 0 (default) matches
            scikit-learn's ``f1_score(labels=range(K), average="macro", zero_division=0)``: a subtype the
            cases never show cannot raise the score. ``float("nan")`` leaves such classes out (the mean
            over the classes present, scikit-learn's default labels), which flatters small sets.

    NaN when there are no samples.
    """
    f1 = per_class_f1(targets, predictions, num_classes)
    if not _as_numpy(targets).size:
        return float("nan")
    return finite_mean(np.where(np.isnan(f1), zero_division, f1))


def balanced_accuracy(targets, predictions, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in the targets."""
    return finite_mean(per_class_recall(targets, predictions, num_classes))


def accuracy(targets, predictions) -> float:
    """Share of correct predictions; NaN for no samples."""
    y_true, y_pred, _ = _class_vectors(targets, predictions, None)
    return float((y_true == y_pred).mean()) if y_true.size else float("nan")


def binary_auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann-Whitney U, ties count
    half); NaN when there are no positives or no negatives."""
    scores = _as_numpy(scores).astype(np.float64).reshape(-1)
    positives = _as_numpy(positives).astype(bool).reshape(-1)
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(probabilities, targets) -> np.ndarray:
    """(K,) one-vs-rest AUROC of each class's column of ``probabilities`` (N, K) against ``targets`` (N,);
    NaN for a class absent from the targets (or that every target has)."""
    scores = _as_numpy(probabilities).astype(np.float64)
    y_true = _as_numpy(targets).astype(np.int64).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != y_true.size:
        raise ValueError(f"probabilities must be (N, K) with N = {y_true.size} targets, got {scores.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= scores.shape[1]):
        raise ValueError(f"targets must be classes 0..{scores.shape[1] - 1}, "
                         f"got {sorted(set(y_true.tolist()))}")
    return np.array([binary_auroc(scores[:, k], y_true == k) for k in range(scores.shape[1])])


def macro_auroc(probabilities, targets) -> float:
    """Mean one-vs-rest AUROC over the classes where it is defined."""
    return finite_mean(per_class_auroc(probabilities, targets))


def classification_scores(targets: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray | None,
                          num_subtypes: int) -> dict[str, float]:
    """Macro F1 (over all ``num_subtypes`` declared subtypes), balanced accuracy and accuracy of the
    predicted subtypes, per-subtype F1 and recall, and with probabilities the one-vs-rest AUROC per
    subtype and their mean."""
    scores = {"macro_f1": macro_f1(targets, predicted, num_subtypes),
              "balanced_accuracy": balanced_accuracy(targets, predicted, num_subtypes),
              "accuracy": accuracy(targets, predicted)}
    f1, recall = per_class_f1(targets, predicted, num_subtypes), per_class_recall(targets, predicted, num_subtypes)
    for k in range(num_subtypes):
        scores[f"f1_{k}"], scores[f"recall_{k}"] = float(f1[k]), float(recall[k])
    if probabilities is not None:
        auroc = per_class_auroc(probabilities, targets)
        scores["macro_auroc"] = finite_mean(auroc)
        scores.update({f"auroc_{k}": float(auroc[k]) for k in range(num_subtypes)})
    return scores


class ClassificationMetrics:
    """Collects per-case subtype probabilities over a validation epoch and scores them once.

    ``update(probabilities, targets)`` takes (N, K) or (K,) probabilities (softmax, or one-vs-rest
    sigmoids: the prediction is the argmax either way) and (N,) or scalar targets; cases with an
    unknown subtype (-1) are kept out. ``compute()`` returns macro F1 (over all ``num_classes``, as
    :func:`macro_f1`), balanced accuracy, accuracy, macro AUROC, and per class F1, recall and AUROC (NaN
    where undefined), plus the number of cases.
    """

    def __init__(self, num_classes: int = 3):
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self._probabilities: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, probabilities, targets) -> None:
        scores = _as_numpy(probabilities).astype(np.float64).reshape(-1, self.num_classes)
        y_true = _as_numpy(targets).astype(np.int64).reshape(-1)
        if scores.shape[0] != y_true.size:
            raise ValueError(f"{scores.shape[0]} probability rows for {y_true.size} targets")
        known = y_true != UNKNOWN_SUBTYPE
        self._probabilities.append(scores[known])
        self._targets.append(y_true[known])

    @property
    def probabilities(self) -> np.ndarray:
        return np.concatenate(self._probabilities) if self._probabilities else np.zeros((0, self.num_classes))

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate(self._targets) if self._targets else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(sum(t.size for t in self._targets))

    def confusion_matrix(self) -> np.ndarray:
        return confusion_matrix(self.targets, self.probabilities.argmax(1), self.num_classes)

    def compute(self) -> dict[str, float]:
        """:func:`classification_scores` of the collected cases (the argmax as the prediction), and their number."""
        probabilities, targets = self.probabilities, self.targets
        predictions = probabilities.argmax(1) if len(targets) else np.zeros(0, dtype=np.int64)
        return {**classification_scores(targets, predictions, probabilities, self.num_classes),
                "num_cases": float(len(targets))}
