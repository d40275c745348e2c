"""Our lesion_attention head: attention pooling over the lesion, truth guidance and its jitter, region
pooling and the image statistics."""

from __future__ import annotations

import pytest
import torch

from pancreas_mtl.models import LesionAttentionHead, MultiTaskNet, UNetOutput
from pancreas_mtl.models.pooling import jitter_mask, lesion_image_statistics, lesion_regions
from tests.conf_values import head_values
from tests.test_models import PATCH, tiny_net


def attention_head(decoder_channels, **changes) -> LesionAttentionHead:
    """conf/model/head/lesion_attention.yaml's head without truth guidance, its jitter or the image statistics
    (each test turns on what it is about), ``changes`` over it."""
    knobs = {"truth_guidance": 0.0, "truth_jitter": 0, "image_statistics": False, **changes}
    return LesionAttentionHead(decoder_channels, 3, **head_values("lesion_attention", **knobs))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(0))


def test_lesion_attention_is_uniform_without_lesion_and_focused_on_one():
    head = attention_head([8], init_temperature=0.05)
    p = torch.zeros(2, 1, 2, 4, 4)
    p[1, 0, 1, 2, 3] = 1.0  # second patch: certain lesion in one voxel
    weights = head.attention_weights(p, stage=0)
    torch.testing.assert_close(weights[0], torch.full((32,), 1 / 32))
    assert weights[1].argmax().item() == 1 * 16 + 2 * 4 + 3 and weights[1].max() > 0.99


def test_lesion_attention_pools_over_the_true_lesion_in_training_only(image):
    net = tiny_net()
    head = attention_head(net.decoder_channels, dropout=0.0, truth_guidance=1.0)
    model = MultiTaskNet(net, head)
    mask = torch.zeros(image.shape[0], 1, *image.shape[2:], dtype=torch.bool)
    mask[:, :, 2:5, 3:9, 4:10] = True
    seg_logits = torch.zeros(image.shape[0], 3, *image.shape[2:])
    seg_logits[:, 2] = mask[:, 0] * 50.0 - 25.0  # a network that sees exactly that lesion

    model.train()
    unet = net(image)
    guided = head(unet, mask)
    predicted = head(UNetOutput([seg_logits], unet.decoder_features, unet.bottleneck))
    torch.testing.assert_close(guided, predicted)
    assert not torch.allclose(guided, head(unet))  # the random network's own guess is elsewhere
    _, logits = model(image, mask)  # the wrapper hands the mask to the head
    torch.testing.assert_close(logits, guided)

    model.eval()
    torch.testing.assert_close(head(unet, mask), head(unet))  # inference: the prediction guides
    with pytest.raises(ValueError, match="truth_guidance"):
        attention_head([8], truth_guidance=1.5)


def test_lesion_attention_meanmax_sees_a_bright_voxel_inside_the_lesion_only():
    head = attention_head([1], pool="meanmax", dropout=0.0, init_temperature=0.05)
    with torch.no_grad():
        head.project[0].weight.copy_(torch.tensor([[0.0, 1.0]]))  # the token is the max part
        head.project[0].bias.zero_()
    seg = torch.full((1, 3, 2, 4, 4), -20.0)
    seg[:, 2, 0, :2, :2] = 20.0                                     # the lesion: 4 voxels
    features = torch.zeros(1, 1, 2, 4, 4)
    unet = UNetOutput([seg], [features], features)
    outside, inside = features.clone(), features.clone()
    outside[0, 0, 1, 3, 3] = 5.0                                    # bright, but not in the lesion
    inside[0, 0, 0, 1, 1] = 5.0                                     # bright, in the lesion
    assert torch.allclose(head(UNetOutput([seg], [outside], outside)), head(unet), atol=1e-4)
    assert not torch.allclose(head(UNetOutput([seg], [inside], inside)), head(unet), atol=1e-4)
    with pytest.raises(ValueError, match="lesion pooling"):
        attention_head([8], pool="median")


def test_lesion_regions_split_a_mask_into_core_rim_and_ring():
    lesion = torch.zeros(1, 1, 7, 7, 7)
    lesion[:, :, 1:6, 1:6, 1:6] = 1.0                                # a 5^3 cube
    core, rim, ring = lesion_regions(lesion)[0]
    assert core.sum() == 27 and core[2:5, 2:5, 2:5].all()           # the inner 3^3
    assert rim.sum() == 125 - 27 and ring.sum() == 7 ** 3 - 125       # the cube's shell, its outside
    torch.testing.assert_close(core + rim, lesion[0, 0])


def test_lesion_attention_regions_tell_a_bright_rim_from_a_bright_core():
    head = attention_head([1], pool="regions", dropout=0.0, init_temperature=1.0)
    seg = torch.full((1, 3, 7, 7, 7), -20.0)
    seg[:, 0] = 20.0                                                 # background ...
    seg[:, 0, 1:6, 1:6, 1:6], seg[:, 2, 1:6, 1:6, 1:6] = -20.0, 20.0  # ... around a 5^3 lesion
    bright_rim = torch.zeros(1, 1, 7, 7, 7)
    bright_rim[:, :, 1:6, 1:6, 1:6] = 1.0
    bright_rim[:, :, 2:5, 2:5, 2:5] = 0.0
    bright_core = torch.zeros(1, 1, 7, 7, 7)
    bright_core[:, :, 2:5, 2:5, 2:5] = 98 / 27                      # same lesion mean as bright_rim
    means = [head.pool_stage(f, lesion_regions(head.lesion_probability(seg)), 0) for f in (bright_rim, bright_core)]
    assert means[0].shape == (1, 3)
    assert means[0][0, 1] > 0.99 and means[0][0, 0] < 0.01        # rim pooled bright, core dark
    assert means[1][0, 0] > 3.5 and means[1][0, 1] < 0.01
    assert head(UNetOutput([seg], [bright_rim], bright_rim)).shape == (1, 3)


def test_jitter_mask_erodes_keeps_or_dilates_each_sample():
    mask = torch.zeros(60, 1, 7, 7, 7)
    mask[:, :, 2:5, 2:5, 2:5] = 1.0
    torch.manual_seed(0)
    sizes = jitter_mask(mask, 1).sum(dim=(1, 2, 3, 4)).tolist()
    assert set(sizes) == {1.0, 27.0, 125.0}                          # eroded, kept, dilated: all occur
    assert torch.equal(jitter_mask(mask, 0), mask)


def test_lesion_image_statistics_read_the_image_under_the_lesion():
    lesion = torch.zeros(1, 1, 9, 9, 9)
    lesion[:, :, 2:7, 2:7, 2:7] = 1.0
    image = torch.zeros(1, 1, 9, 9, 9)
    image[:, :, 2:7, 2:7, 2:7] = 1.0                                  # lesion 1, around it 0
    image[:, :, 3:6, 3:6, 3:6] = 3.0                                  # a bright core
    stats = lesion_image_statistics(image, lesion)
    mean = (27 * 3.0 + 98 * 1.0) / 125
    assert stats.shape == (1, 7)
    torch.testing.assert_close(stats[0, 0], torch.tensor(mean))
    torch.testing.assert_close(stats[0, 1], torch.tensor(((27 * 9 + 98) / 125 - mean ** 2) ** 0.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(stats[0, 2], torch.tensor(2.0))          # core minus rim
    torch.testing.assert_close(stats[0, 3], torch.tensor(mean))         # lesion minus the ring (0)
    flat = lesion_image_statistics(torch.ones(1, 1, 9, 9, 9), lesion)
    torch.testing.assert_close(flat[0, 4:], torch.zeros(3))             # no edges: no gradient


def test_lesion_attention_with_image_statistics_needs_and_uses_the_image(image):
    net = tiny_net()
    head = attention_head(net.decoder_channels, dropout=0.0, image_statistics=True, input_channels=1)
    model = MultiTaskNet(net, head).eval()
    unet = net(image)
    with pytest.raises(ValueError, match="image"):
        head(unet)
    _, logits = model(image)                                            # the wrapper hands the input over
    torch.testing.assert_close(logits, head(unet, image=image))
    assert not torch.allclose(logits, head(unet, image=image + 1.0))
