"""Where the PANDA-family heads pool: global pooling, pooling over a predicted (or, in training, true)
region, and the fallback to the whole patch where no region is found."""

from __future__ import annotations

import pytest
import torch

from pancreas_mtl.models.pooling import MIN_GUIDE, RegionGuide, global_pool, region_pool


def features_with_a_bright_corner() -> tuple[torch.Tensor, torch.Tensor]:
    """features (1, 2, 4, 4, 4): channel 0 is 10 in one corner voxel and 1 elsewhere; a guide (1, 1, 4, 4, 4)
    on the opposite 2 x 2 x 2 corner, where channel 1 is 5."""
    features = torch.ones(1, 2, 4, 4, 4)
    features[0, 0, 0, 0, 0] = 10.0
    features[0, 1, 2:, 2:, 2:] = 5.0
    guide = torch.zeros(1, 1, 4, 4, 4)
    guide[0, 0, 2:, 2:, 2:] = 1.0
    return features, guide


def test_region_pooling_reads_only_the_region():
    features, guide = features_with_a_bright_corner()
    torch.testing.assert_close(global_pool(features, "max"), torch.tensor([[10.0, 5.0]]))
    torch.testing.assert_close(region_pool(features, guide, "max"), torch.tensor([[1.0, 5.0]]))
    torch.testing.assert_close(region_pool(features, guide, "avg"), torch.tensor([[1.0, 5.0]]))
    torch.testing.assert_close(region_pool(features, guide, "avgmax"), torch.tensor([[1.0, 5.0]]))


def test_region_pooling_follows_the_guide_at_another_resolution():
    features, guide = features_with_a_bright_corner()
    fine = torch.nn.functional.interpolate(guide, scale_factor=2, mode="nearest")   # (1, 1, 8, 8, 8)
    torch.testing.assert_close(region_pool(features, fine, "max"), torch.tensor([[1.0, 5.0]]))


def test_without_a_region_the_whole_patch_is_pooled():
    features, _ = features_with_a_bright_corner()
    faint = torch.full((1, 1, 4, 4, 4), MIN_GUIDE / 2)
    for pool in ("max", "avg", "avgmax"):
        torch.testing.assert_close(region_pool(features, faint, pool), global_pool(features, pool))


def test_the_guide_is_the_predicted_lesion_or_pancreas_and_the_truth_only_in_training():
    logits = torch.zeros(2, 3, 4, 4, 4)
    logits[:, 2, :2] = 20.0   # lesion in the first half
    logits[:, 1, 2:] = 20.0   # pancreas in the second
    lesion = RegionGuide("lesion")
    assert lesion(logits)[:, :, :2].min() > 0.99 and lesion(logits)[:, :, 2:].max() < 0.01
    pancreas = RegionGuide("pancreas")
    assert pancreas(logits).min() > 0.99               # pancreas or lesion everywhere
    assert RegionGuide("patch")(logits) is None

    truth = torch.zeros(2, 1, 4, 4, 4)
    truth[:, :, 3] = 1.0
    guided = RegionGuide("lesion", truth_guidance=1.0).train()
    torch.testing.assert_close(guided(logits, truth), truth)
    torch.testing.assert_close(guided.eval()(logits, truth), lesion(logits))


def test_region_guide_rejects_bad_knobs():
    with pytest.raises(ValueError, match="pooling region"):
        RegionGuide("organ")
    with pytest.raises(ValueError, match="needs region 'lesion'"):
        RegionGuide("pancreas", truth_guidance=0.5)
    with pytest.raises(ValueError, match="truth_jitter"):
        RegionGuide("lesion", truth_jitter=-1)
