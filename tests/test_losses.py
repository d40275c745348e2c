"""Losses on hand-made inputs: Dice + CE values, deep supervision, subtype loss policies, Hydra configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pancreas_mtl.losses import (
    ClassificationLoss,
    MultiTaskLoss,
    SegmentationLoss,
    deep_supervision_weights,
    downsample_label,
    inverse_frequency_pos_weight,
    inverse_frequency_weights,
    soft_dice_loss,
    subtype_count_list,
)
from tests.conf_values import classification_loss_values, segmentation_loss_values

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
LN3 = math.log(3.0)


def segmentation_loss(**changes) -> SegmentationLoss:
    """conf/loss/default.yaml's ``seg_loss`` with ``changes``."""
    return SegmentationLoss(**segmentation_loss_values(**changes))


def classification_loss(**changes) -> ClassificationLoss:
    """conf/loss/default.yaml's ``cls_loss`` with ``changes``, unweighted unless they give class weights (its
    inverse-frequency weights need the training split's counts)."""
    return ClassificationLoss(**classification_loss_values(**{"class_weights": None, **changes}))


def labels_1d(*rows: list[int]) -> torch.Tensor:
    """(B, 1, 1, 1, X) label tensor from one list of voxel labels per sample."""
    return torch.tensor(rows, dtype=torch.int64)[:, None, None, None, :]


def confident_logits(label: torch.Tensor, num_classes: int = 3, scale: float = 100.0) -> torch.Tensor:
    """(B, C, ...) logits whose softmax is (numerically) the one-hot of ``label`` (B, 1, ...)."""
    return scale * F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float()


# --- segmentation -----------------------------------------------------------------------------------

def test_perfect_prediction_gives_dice_minus_one_and_ce_zero():
    label = labels_1d([0, 1, 1, 2, 0, 0, 2, 1], [1, 1, 0, 0, 2, 2, 0, 0])
    terms = segmentation_loss()(confident_logits(label), label)
    assert terms["dice"].item() == pytest.approx(-1.0, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["seg"].item() == pytest.approx(-1.0, abs=1e-6)


def test_uniform_logits_give_ln3_ce_and_known_dice():
    # 8 voxels, 2 of class 1 and 2 of class 2: soft Dice per class = (2 * 2/3) / (8/3 + 2) = 2/7
    label = labels_1d([0, 1, 1, 2, 2, 0, 0, 0])
    logits = torch.zeros(1, 3, 1, 1, 8)
    terms = segmentation_loss(smooth=0.0)(logits, label)
    assert terms["ce"].item() == pytest.approx(LN3, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(-2 / 7, rel=1e-6)
    # background included: its Dice is (2 * 4/3) / (8/3 + 4) = 2/5
    with_background = soft_dice_loss(logits, label, include_background=True, smooth=0.0)
    assert with_background.item() == pytest.approx(-(2 / 7 + 2 / 7 + 2 / 5) / 3, rel=1e-6)


def test_batch_dice_pools_voxels_over_the_batch():
    # sample 0: class 1 at {0, 1}, predicted at {0, 1} -> 1; sample 1: class 1 at {0..3}, predicted {0, 1} -> 2/3
    # class 2 is exact in both samples
    label = labels_1d([1, 1, 0, 0, 0, 0, 2, 2], [1, 1, 1, 1, 0, 0, 2, 2])
    predicted = labels_1d([1, 1, 0, 0, 0, 0, 2, 2], [1, 1, 0, 0, 0, 0, 2, 2])
    logits = confident_logits(predicted)
    per_sample = soft_dice_loss(logits, label, batch_dice=False, smooth=0.0)
    pooled = soft_dice_loss(logits, label, batch_dice=True, smooth=0.0)
    assert per_sample.item() == pytest.approx(-(1 + 2 / 3 + 1 + 1) / 4, rel=1e-6)
    assert pooled.item() == pytest.approx(-(8 / 10 + 1) / 2, rel=1e-6)  # class 1: 2 * 4 / (4 + 6)


def test_smooth_keeps_empty_class_finite():
    label = labels_1d([0, 0, 1, 1])  # no lesion in the patch
    logits = confident_logits(label)
    value = soft_dice_loss(logits, label)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(-1.0, abs=1e-4)  # empty vs (almost) empty lesion: smooth/smooth


@pytest.mark.parametrize("num_outputs, expected", [
    (1, [1.0]),
    (2, [1.0, 0.0]),
    (3, [2 / 3, 1 / 3, 0.0]),
    (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0]),
])
def test_deep_supervision_weights(num_outputs, expected):
    weights = deep_supervision_weights(num_outputs)
    assert weights == pytest.approx(expected)
    assert sum(weights) == pytest.approx(1.0)


def test_downsample_label_shapes_and_nearest_values():
    z, y, x = torch.meshgrid(torch.arange(4), torch.arange(8), torch.arange(8), indexing="ij")
    label = ((z + 2 * y + 3 * x) % 3).to(torch.uint8)[None, None].repeat(2, 1, 1, 1, 1)  # (2, 1, 4, 8, 8)
    shapes = [(4, 8, 8), (4, 4, 4), (2, 2, 2)]  # first stride (1, 2, 2), then (2, 2, 2)
    targets = downsample_label(label, shapes)
    assert targets[0] is label
    assert [tuple(t.shape) for t in targets] == [(2, 1, 4, 8, 8), (2, 1, 4, 4, 4), (2, 1, 2, 2, 2)]
    assert all(t.dtype == torch.uint8 for t in targets)
    # nearest-exact (nnU-Net's choice) samples voxel floor((i + 0.5) * factor): 2i + 1 for factor 2, 4i + 2 for 4
    assert torch.equal(targets[1], label[:, :, :, 1::2, 1::2])
    assert torch.equal(targets[2], label[:, :, 1::2, 2::4, 2::4])


def test_deep_supervision_sums_weighted_outputs_and_reaches_the_lowest_output():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 4, 8, 8))
    shapes = [(4, 8, 8), (4, 4, 4), (2, 2, 2)]
    outputs = [torch.randn(2, 3, *s, requires_grad=True) for s in shapes]
    loss = segmentation_loss()
    terms = loss(outputs, label)
    weights = deep_supervision_weights(3)
    expected_dice = sum(w * soft_dice_loss(o, t) for w, o, t in zip(weights, outputs, downsample_label(label, shapes)))
    expected_ce = sum(w * F.cross_entropy(o, t[:, 0].long())
                      for w, o, t in zip(weights, outputs, downsample_label(label, shapes)))
    assert terms["dice"].item() == pytest.approx(expected_dice.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert terms["seg"].item() == pytest.approx((expected_dice + expected_ce).item(), rel=1e-5)
    terms["seg"].backward()
    assert outputs[-1].grad is not None and torch.count_nonzero(outputs[-1].grad) == 0  # weight 0, still in graph
    assert torch.count_nonzero(outputs[0].grad) > 0
    # pre-downsampled targets give the same value
    again = loss([o.detach() for o in outputs], downsample_label(label, shapes))
    assert again["seg"].item() == pytest.approx(terms["seg"].item(), rel=1e-6)


def test_deep_supervision_off_uses_the_first_output_only():
    torch.manual_seed(1)
    label = torch.randint(0, 3, (1, 1, 4, 4, 4))
    outputs = [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    off = segmentation_loss(deep_supervision=False, weight_dice=2.0, weight_ce=0.5)(outputs, label)
    single = segmentation_loss(weight_dice=2.0, weight_ce=0.5)(outputs[0], label)
    assert off["seg"].item() == pytest.approx(single["seg"].item())
    assert off["seg"].item() == pytest.approx(2.0 * off["dice"].item() + 0.5 * off["ce"].item(), rel=1e-6)


def test_explicit_deep_supervision_weights_are_normalised_and_checked():
    loss = segmentation_loss(deep_supervision_weights=[2.0, 2.0])
    assert loss.output_weights(2) == [0.5, 0.5]
    with pytest.raises(ValueError, match="3 segmentation outputs"):
        loss.output_weights(3)


# --- classification ---------------------------------------------------------------------------------

def test_inverse_frequency_weights_and_counts():
    assert inverse_frequency_weights([62, 106, 84]) == pytest.approx([252 / 186, 252 / 318, 1.0])
    assert inverse_frequency_weights([2, 0, 2]) == pytest.approx([1.0, 0.0, 1.0])
    assert inverse_frequency_pos_weight([62, 106, 84]) == pytest.approx([190 / 62, 146 / 106, 168 / 84])
    assert subtype_count_list({"0": 62, "2": 84, "1": 106, "-1": 5}, 3) == [62, 106, 84]
    with pytest.raises(ValueError, match="one per class"):
        subtype_count_list([1, 2], 3)


def test_ce_of_uniform_logits_is_ln3():
    loss = classification_loss(no_lesion_policy="case_label")
    value = loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 1]))
    assert value.item() == pytest.approx(LN3, rel=1e-6)


def test_class_weights_scale_each_sample():
    logits, subtype = torch.zeros(2, 3), torch.tensor([0, 1])
    sample_mean = classification_loss(class_weights=[2.0, 1.0, 1.0], no_lesion_policy="case_label")
    weight_mean = classification_loss(class_weights=[2.0, 1.0, 1.0], no_lesion_policy="case_label",
                                     reduction="weight_mean")
    assert sample_mean(logits, subtype).item() == pytest.approx(1.5 * LN3, rel=1e-6)
    assert weight_mean(logits, subtype).item() == pytest.approx(LN3, rel=1e-6)
    # a single sample: torch's weighted mean cancels the weight, ours keeps it
    assert sample_mean(logits[:1], subtype[:1]).item() == pytest.approx(2 * LN3, rel=1e-6)
    assert weight_mean(logits[:1], subtype[:1]).item() == pytest.approx(LN3, rel=1e-6)


def test_inverse_frequency_needs_counts_and_uses_them():
    with pytest.raises(ValueError, match="subtype_counts"):
        classification_loss(class_weights="inverse_frequency")
    loss = classification_loss(class_weights="inverse_frequency", subtype_counts={0: 62, 1: 106, 2: 84},
                              no_lesion_policy="case_label")
    assert loss.class_weights.tolist() == pytest.approx([252 / 186, 252 / 318, 1.0])
    value = loss(torch.zeros(3, 3), torch.tensor([0, 1, 2]))
    assert value.item() == pytest.approx(LN3 * (252 / 186 + 252 / 318 + 1.0) / 3, rel=1e-6)
    assert "class_weights" not in loss.state_dict()  # config, not weights


def test_label_smoothing_matches_torch_and_raises_confident_loss():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    subtype = torch.tensor([0, 1])
    for eps in (0.0, 0.1, 0.3):
        ours = classification_loss(label_smoothing=eps, no_lesion_policy="case_label")(logits, subtype)
        reference = F.cross_entropy(logits, subtype, label_smoothing=eps)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    # hand value for the confident sample: p0 = e^4 / (e^4 + 2); targets (1 - eps + eps/3, eps/3, eps/3)
    eps = 0.3
    log_p0 = 4.0 - math.log(math.exp(4.0) + 2)
    log_p_other = -math.log(math.exp(4.0) + 2)
    hand = -((1 - eps + eps / 3) * log_p0 + 2 * (eps / 3) * log_p_other)
    smoothed = classification_loss(label_smoothing=eps, no_lesion_policy="case_label")(logits[:1], subtype[:1])
    assert smoothed.item() == pytest.approx(hand, rel=1e-6)
    assert hand > -log_p0


def test_skip_policy_uses_only_lesion_patches_with_known_subtype():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 3.0], [0.0, 4.0, 0.0]])
    subtype = torch.tensor([0, 2, -1, 1])
    has_lesion = torch.tensor([True, False, True, True])
    skip = classification_loss(no_lesion_policy="skip")
    kept = torch.tensor([0, 3])
    assert skip.sample_mask(subtype, has_lesion).tolist() == [True, False, False, True]
    assert skip(logits, subtype, has_lesion).item() == pytest.approx(
        F.cross_entropy(logits[kept], subtype[kept]).item(), rel=1e-6)
    case_label = classification_loss(no_lesion_policy="case_label")
    kept = torch.tensor([0, 1, 3])
    assert case_label(logits, subtype, has_lesion).item() == pytest.approx(
        F.cross_entropy(logits[kept], subtype[kept]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="has_lesion"):
        skip(logits, subtype)


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_all_skipped_batch_gives_zero_with_grad(kind):
    logits = torch.randn(2, 3, requires_grad=True)
    loss = classification_loss(kind=kind)(logits, torch.tensor([-1, 1]), torch.tensor([True, False]))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_one_vs_rest_bce_values():
    loss = classification_loss(kind="bce", no_lesion_policy="case_label")
    assert loss(torch.zeros(2, 3), torch.tensor([0, 2])).item() == pytest.approx(math.log(2), rel=1e-6)

    def softplus(v):
        return math.log1p(math.exp(v))

    logits, subtype = torch.tensor([[2.0, -1.0, 0.0]]), torch.tensor([0])
    # target (1, 0, 0): BCE = softplus(-2), softplus(-1), softplus(0), averaged over the 3 outputs
    hand = (softplus(-2.0) + softplus(-1.0) + softplus(0.0)) / 3
    assert loss(logits, subtype).item() == pytest.approx(hand, rel=1e-6)
    weighted = classification_loss(kind="bce", pos_weight=[3.0, 1.0, 1.0], no_lesion_policy="case_label")
    assert weighted(logits, subtype).item() == pytest.approx((3 * softplus(-2.0) + softplus(-1.0) + softplus(0.0)) / 3,
                                                             rel=1e-6)
    # label smoothing eps: targets (1 - eps/2, eps/2, eps/2)
    eps = 0.2
    smoothed = classification_loss(kind="bce", label_smoothing=eps, no_lesion_policy="case_label")
    hand = sum(F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(t)).item()
               for x, t in ((2.0, 1 - eps / 2), (-1.0, eps / 2), (0.0, eps / 2))) / 3
    assert smoothed(logits, subtype).item() == pytest.approx(hand, rel=1e-6)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="pos_weight"):
        classification_loss(kind="ce", pos_weight=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no_lesion_policy"):
        classification_loss(no_lesion_policy="sometimes")
    with pytest.raises(ValueError, match="subtypes must be"):
        classification_loss(no_lesion_policy="case_label")(torch.zeros(1, 3), torch.tensor([3]))


# --- multi-task -------------------------------------------------------------------------------------

def _batch():
    torch.manual_seed(2)
    label = torch.zeros(2, 1, 4, 8, 8, dtype=torch.int64)
    label[:, :, 1:3, 2:6, 2:6] = 1
    label[0, :, 1:3, 3:5, 3:5] = 2  # only sample 0 holds lesion voxels
    seg_logits = [torch.randn(2, 3, 4, 8, 8, requires_grad=True), torch.randn(2, 3, 2, 4, 4, requires_grad=True)]
    class_logits = torch.randn(2, 3, requires_grad=True)
    return seg_logits, class_logits, label, torch.tensor([1, 2])


def test_multitask_total_and_terms():
    seg_logits, class_logits, label, subtype = _batch()
    loss = MultiTaskLoss(segmentation_loss(), classification_loss(), cls_weight=0.3)
    terms = loss(seg_logits, class_logits, label, subtype)
    assert set(terms) == {"loss", "seg", "dice", "ce", "cls", "cls_samples"}
    # has_lesion from the label: only sample 0 is used
    assert terms["cls_samples"].item() == 1
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(class_logits[:1], subtype[:1]).item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["seg"].item() + 0.3 * terms["cls"].item(), rel=1e-6)
    terms["loss"].backward()
    assert torch.count_nonzero(class_logits.grad[0]) > 0 and torch.count_nonzero(class_logits.grad[1]) == 0
    # a has_lesion flag from the batch is ignored (and deprecated): the label decides
    with pytest.warns(DeprecationWarning, match="has_lesion"):
        flagged = loss(seg_logits, class_logits, label, subtype, has_lesion=torch.tensor([True, True]))
    assert flagged["cls_samples"].item() == 1


@pytest.mark.filterwarnings("ignore:MultiTaskLoss ignores has_lesion:DeprecationWarning")
def test_lesion_label_decides_which_patches_teach_the_head():
    """A dataset whose lesion is label 3: the loss reads lesion patches off the label with its lesion_label.
    Before, the batch's has_lesion (the sampler's, label 2) always won and lesion_label had no effect."""
    torch.manual_seed(3)
    label = torch.zeros(2, 1, 4, 8, 8, dtype=torch.int64)
    label[:, :, 1:3, 2:6, 2:6] = 1
    label[0, :, 1:3, 3:5, 3:5] = 2                  # sample 0: another structure
    label[1, :, 1:3, 3:5, 3:5] = 3                  # sample 1: the lesion
    seg_logits, class_logits, subtype = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 3), torch.tensor([1, 2])
    sampler_flag = (label == 2).flatten(1).any(1)   # [True, False]
    loss = MultiTaskLoss(segmentation_loss(), classification_loss(), cls_weight=0.3, lesion_label=3)
    terms = loss(seg_logits, class_logits, label, subtype, sampler_flag)
    assert terms["cls_samples"].item() == 1
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(class_logits[1:], subtype[1:]).item(), rel=1e-6)


def test_multitask_without_classification():
    seg_logits, class_logits, label, subtype = _batch()
    with_subtype_loss = MultiTaskLoss(segmentation_loss(), classification_loss(), cls_weight=0.3)
    with_head_off = with_subtype_loss(seg_logits, None, label, subtype)
    seg_only = MultiTaskLoss(segmentation_loss(), None, cls_weight=0.0)(seg_logits, class_logits, label, subtype)
    for terms in (with_head_off, seg_only):
        assert terms["cls"].item() == 0.0 and terms["cls_samples"].item() == 0
        assert terms["loss"].item() == pytest.approx(terms["seg"].item())


# --- Hydra configs ----------------------------------------------------------------------------------

def _compose(loss_config: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+loss={loss_config}", "+num_subtypes=3"])


def test_default_config_instantiates_with_counts_at_call_time():
    from hydra.utils import instantiate

    cfg = _compose("default")
    loss = instantiate(cfg.loss, cls_loss={"subtype_counts": [62, 106, 84]})
    assert isinstance(loss, MultiTaskLoss) and loss.cls_weight == 0.3
    assert isinstance(loss.seg_loss, SegmentationLoss) and not loss.seg_loss.batch_dice
    assert loss.cls_loss.kind == "ce" and loss.cls_loss.no_lesion_policy == "skip"
    assert loss.cls_loss.class_weights.tolist() == pytest.approx([252 / 186, 252 / 318, 1.0])
    # a {subtype: cases} mapping works too, e.g. a fingerprint's subtype_counts read from JSON
    from_mapping = instantiate(cfg.loss, cls_loss={"subtype_counts": {"0": 62, "1": 106, "2": 84}})
    assert from_mapping.cls_loss.class_weights.tolist() == pytest.approx([252 / 186, 252 / 318, 1.0])
    seg_logits, class_logits, label, subtype = _batch()
    assert torch.isfinite(loss(seg_logits, class_logits, label, subtype)["loss"])



def test_lesion_label_is_the_plans_not_a_loss_setting():
    from hydra.utils import instantiate

    from pancreas_mtl.planning.plan import LESION_LABEL, Plan

    cfg = _compose("default")
    assert "lesion_label" not in cfg.loss   # a second copy of the plan's label would go stale
    assert instantiate(cfg.loss, cls_loss={"subtype_counts": [1, 1, 1]}).lesion_label == LESION_LABEL
    assert Plan.__dataclass_fields__["labels"].default_factory()["lesion"] == LESION_LABEL
    built = instantiate(cfg.loss, cls_loss={"subtype_counts": [1, 1, 1]}, lesion_label=3)  # as build_module does
    assert built.lesion_label == 3


def test_variant_configs():
    from hydra.utils import instantiate

    seg_only = instantiate(_compose("seg_only").loss)
    assert seg_only.cls_loss is None and seg_only.cls_weight == 0.0
    ovr = instantiate(_compose("ovr").loss, cls_loss={"subtype_counts": [62, 106, 84]})
    assert ovr.cls_loss.kind == "bce" and ovr.cls_loss.class_weights is None
    assert ovr.cls_loss.pos_weight.tolist() == pytest.approx([190 / 62, 146 / 106, 168 / 84])
