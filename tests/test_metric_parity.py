"""Our hand-written Dice, HD95 and NSD against MONAI's, and macro F1 against scikit-learn's, on random
anisotropic masks: they must agree to 2e-5 wherever both masks are non-empty. Where a mask is empty the
conventions differ on purpose (MONAI: NaN; ours: see evaluation/metrics.py), pinned here too."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from pancreas_mtl.evaluation.metrics import (
    dice,
    hausdorff_distance_95,
    image_diagonal_mm,
    macro_f1,
    normalised_surface_dice,
)

monai_metrics = pytest.importorskip("monai.metrics")

TOLERANCE = 2e-5
# (shape (z, y, x), spacing (z, y, x) in mm): CT-like anisotropy, thin slabs, masks touching the border
GRIDS = [((12, 40, 36), (2.5, 0.8, 0.8)), ((20, 24, 28), (1.0, 1.0, 1.0)), ((8, 30, 30), (5.0, 0.7, 0.9)),
         ((16, 16, 48), (0.6, 1.7, 3.0))]


def blob(rng: np.random.Generator, shape, fill: float) -> np.ndarray:
    """A lumpy random mask: smoothed noise above its ``1 - fill`` quantile (several components, holes)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return noise > np.quantile(noise, 1.0 - fill)


def mask_pairs():
    """(case id, prediction, reference, spacing): a near miss (reference dilated and shifted) and an
    unrelated blob on every grid, for a few seeds."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for shape, spacing in GRIDS:
            reference = blob(rng, shape, fill=rng.uniform(0.05, 0.3))
            shifted = np.roll(ndimage.binary_dilation(reference), shift=(0, 1, -2), axis=(0, 1, 2))
            yield f"seed{seed}-{shape}-near", shifted, reference, spacing
            yield f"seed{seed}-{shape}-other", blob(rng, shape, fill=0.1), reference, spacing


PAIRS = list(mask_pairs())


def monai_input(mask: np.ndarray) -> torch.Tensor:
    """A (Z, Y, X) mask as MONAI's one-hot (B=1, C=1, Z, Y, X) batch (background channel left out)."""
    return torch.from_numpy(mask[None, None].astype(np.float32))


def monai_scores(pred: np.ndarray, true: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    p, t = monai_input(pred), monai_input(true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; the empty cases are the point below
        return {
            "dice": float(monai_metrics.compute_dice(p, t, include_background=True)),
            "hd95": float(monai_metrics.compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                                                   spacing=list(spacing))),
            "nsd": float(monai_metrics.compute_surface_dice(p, t, class_thresholds=[tolerance_mm],
                                                            include_background=True, spacing=list(spacing))),
        }


@pytest.mark.parametrize(("case", "pred", "true", "spacing"), PAIRS, ids=[p[0] for p in PAIRS])
def test_dice_hd95_nsd_equal_monai(case, pred, true, spacing):
    assert pred.any() and true.any(), case
    tolerance_mm = 2.0
    reference = monai_scores(pred, true, spacing, tolerance_mm)
    assert dice(pred, true) == pytest.approx(reference["dice"], abs=TOLERANCE)
    assert hausdorff_distance_95(pred, true, spacing) == pytest.approx(reference["hd95"], abs=TOLERANCE)
    assert normalised_surface_dice(pred, true, spacing, tolerance_mm) == pytest.approx(reference["nsd"],
                                                                                     abs=TOLERANCE)


@pytest.mark.parametrize("tolerance_mm", [0.0, 0.8, 1.0, 3.5])
def test_nsd_equals_monai_at_other_tolerances(tolerance_mm):
    """Tolerances on and between the grid's distances (the <= at the threshold is MONAI's too)."""
    _, pred, true, spacing = PAIRS[0]
    reference = monai_scores(pred, true, spacing, tolerance_mm)["nsd"]
    assert normalised_surface_dice(pred, true, spacing, tolerance_mm) == pytest.approx(reference, abs=TOLERANCE)


def test_empty_mask_conventions_differ_from_monai_as_documented():
    """MONAI leaves every empty case undefined (NaN); we score a miss as the worst value (Dice 0, NSD 0,
    HD95 the image diagonal) and a correct 'nothing there' as the best (Dice 1, NSD 1, HD95 0)."""
    shape, spacing = GRIDS[0]
    empty, mask = np.zeros(shape, bool), blob(np.random.default_rng(0), shape, fill=0.1)
    diagonal = image_diagonal_mm(shape, spacing)
    for pred, true in ((empty, mask), (mask, empty)):
        reference = monai_scores(pred, true, spacing, 2.0)
        assert math.isnan(reference["hd95"])
        assert hausdorff_distance_95(pred, true, spacing) == pytest.approx(diagonal)
        assert normalised_surface_dice(pred, true, spacing) == 0.0 == reference["nsd"]
        assert dice(pred, true) == 0.0
    reference = monai_scores(empty, empty, spacing, 2.0)
    assert all(math.isnan(value) for value in reference.values())
    assert (dice(empty, empty), normalised_surface_dice(empty, empty, spacing),
            hausdorff_distance_95(empty, empty, spacing)) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_equals_scikit_learn_over_declared_classes(seed):
    """Including classes absent from targets and predictions (scikit-learn: labels=range(K),
    zero_division=0) and, with zero_division=NaN, sklearn's default over the classes present."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    num_classes = 4
    present = rng.choice(num_classes, size=2 + seed % 2, replace=False)  # leave one or two classes out
    targets, predictions = rng.choice(present, 25), rng.choice(present, 25)
    labels = list(range(num_classes))
    assert macro_f1(targets, predictions, num_classes) == pytest.approx(
        metrics.f1_score(targets, predictions, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert macro_f1(targets, predictions, num_classes, zero_division=float("nan")) == pytest.approx(
        metrics.f1_score(targets, predictions, average="macro"), abs=1e-12)
