"""The network: backbone shapes, heads, the multi-task wrapper and its Hydra configs, on tiny CPU sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pancreas_mtl.models import (
    LesionAttentionHead,
    MultiStageHead,
    MultiTaskNet,
    OneVsRestHead,
    ResEncUNet,
    SingleStageHead,
    UNetOutput,
    build_model,
    count_parameters,
)
from pancreas_mtl.planning.plan import ChannelIntensity, ChannelNormalization, Fingerprint, Plan
from pancreas_mtl.planning.planner import load_preset, plan_experiment
from tests.conf_values import head_values

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PATCH = (16, 32, 32)
HEADS = {"single_stage": SingleStageHead, "multistage": MultiStageHead, "ovr": OneVsRestHead,
         "lesion_attention": LesionAttentionHead}


def tiny_plan(features=(4, 8, 16, 16), patch_size=PATCH) -> Plan:
    """A 4-stage plan with the quiz's anisotropic first stage, small enough for CPU tests."""
    return Plan(preset="tiny", target_spacing=(2.0, 0.75, 0.75), median_shape=patch_size, patch_size=patch_size,
                batch_size=2,
                normalization=[ChannelNormalization("ct", clip_low=-56.0, clip_high=180.0, mean=74.9, std=44.1)],
                kernel_sizes=[(1, 3, 3)] + [(3, 3, 3)] * (len(features) - 1),
                strides=[(1, 1, 1), (1, 2, 2)] + [(2, 2, 2)] * (len(features) - 2),
                features_per_stage=list(features), n_blocks_per_stage=[1, 2, 2, 2][:len(features)],
                n_conv_per_stage_decoder=[1] * (len(features) - 1))


def quiz_fingerprint(n: int = 40) -> Fingerprint:
    """Cases at the quiz's median spacing and shape (z, y, x), for planning the real presets."""
    intensity = ChannelIntensity(mean=74.9, std=44.1, percentile_00_5=-56.0, percentile_99_5=180.0, median=76.0,
                                 min=-1024.0, max=3071.0)
    return Fingerprint(case_ids=[f"quiz_{i:03d}" for i in range(n)], spacings=[(2.0, 0.7363, 0.7363)] * n,
                       shapes_after_crop=[(60, 119, 184)] * n, intensity=[intensity],
                       label_voxel_counts={0: 10_000_000, 1: 200_000, 2: 20_000}, subtype_counts={0: 9, 1: 16, 2: 15})


def quiz_plan(preset: str) -> Plan:
    return plan_experiment(quiz_fingerprint(), load_preset(preset))


def tiny_net(deep_supervision: bool = True, **kwargs) -> ResEncUNet:
    return ResEncUNet.from_plan(tiny_plan(**kwargs), deep_supervision=deep_supervision)


def stage_shape(patch, strides, stage):
    """(z, y, x) feature map size of encoder stage ``stage``."""
    shape = list(patch)
    for stride in strides[:stage + 1]:
        shape = [s // f for s, f in zip(shape, stride)]
    return tuple(shape)



@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(0))


# backbone


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_backbone_output_shapes(image, deep_supervision):
    plan = tiny_plan()
    net = ResEncUNet.from_plan(plan, deep_supervision=deep_supervision)
    out = net(image)
    assert isinstance(out, UNetOutput)
    n_decoder = plan.num_stages - 1
    # decoder stage i works at the resolution of encoder stage n_stages - 2 - i
    decoder_shapes = [stage_shape(PATCH, plan.strides, plan.num_stages - 2 - i) for i in range(n_decoder)]
    assert [tuple(f.shape) for f in out.decoder_features] == [
        (2, c, *s) for c, s in zip(net.decoder_channels, decoder_shapes)]
    assert net.decoder_channels == [16, 8, 4]
    expected_seg = [(2, plan.num_classes, *s) for s in reversed(decoder_shapes)]
    assert [tuple(s.shape) for s in out.seg_logits] == (expected_seg if deep_supervision else expected_seg[:1])
    assert out.seg_logits[0].shape[2:] == PATCH
    assert tuple(out.bottleneck.shape) == (2, 16, *stage_shape(PATCH, plan.strides, plan.num_stages - 1))


def test_deep_supervision_can_be_switched_per_call(image):
    net = tiny_net().eval()
    with torch.no_grad():
        full = net(image)
        single = net(image, deep_supervision=False)
    assert len(full.seg_logits) == 3 and len(single.seg_logits) == 1
    torch.testing.assert_close(single.seg_logits[0], full.seg_logits[0])


def test_input_must_be_divisible_by_the_strides():
    net = tiny_net()
    assert net.divisor == (4, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.zeros(1, 1, 16, 32, 36))


@pytest.mark.parametrize("change, message", [
    ({"strides": [(1, 1, 1)] * 3}, "one entry per stage"),
    ({"n_conv_per_stage_decoder": [1, 1, 1, 1]}, "n_conv_per_stage_decoder"),
    ({"kernel_sizes": [(1, 3, 3), (2, 3, 3), (3, 3, 3), (3, 3, 3)]}, "odd"),
])
def test_constructor_checks_sizes(change, message):
    plan = tiny_plan()
    kwargs = {"in_channels": 1, "num_classes": 3, "features_per_stage": plan.features_per_stage,
              "kernel_sizes": plan.kernel_sizes, "strides": plan.strides,
              "n_blocks_per_stage": plan.n_blocks_per_stage,
              "n_conv_per_stage_decoder": plan.n_conv_per_stage_decoder}
    with pytest.raises(ValueError, match=message):
        ResEncUNet(**{**kwargs, **change})


def test_initialisation_is_nnunets():
    net = tiny_net()
    for name, parameter in net.named_parameters():
        if name.endswith("bias") and ".norm." not in name:
            assert torch.count_nonzero(parameter) == 0, name
        if ".conv2.norm." in name:  # init_last_bn_before_add_to_0
            assert torch.count_nonzero(parameter) == 0, name
    conv = net.encoder[1][0].conv1.conv.weight  # He: std sqrt(2 / (1 + 0.01^2) / fan_in)
    fan_in = conv[0].numel()
    assert conv.std().item() == pytest.approx((2 / (1 + 1e-4) / fan_in) ** 0.5, rel=0.15)
    assert torch.all(net.stem.norm.weight == 1)


def test_channels_last_matches_contiguous(image):
    net = tiny_net().eval()
    with torch.no_grad():
        reference = net(image)
        net = net.to(memory_format=torch.channels_last_3d)
        channels_last = net(image.to(memory_format=torch.channels_last_3d))
    for a, b in zip(reference.seg_logits, channels_last.seg_logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_compiles_without_graph_breaks(image):
    """fullgraph=True fails on any data-dependent Python control flow (backend 'eager': tracing only)."""
    backbone = ResEncUNet.from_plan(tiny_plan(features=(4, 8, 8), patch_size=(8, 16, 16)))
    net = MultiTaskNet(backbone, LesionAttentionHead(backbone.decoder_channels, 3,
                                                     **head_values("lesion_attention"))).eval()
    x = image[:, :, :8, :16, :16]
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        (seg, logits), (seg_ref, logits_ref) = compiled(x), net(x)
    torch.testing.assert_close(logits, logits_ref)
    torch.testing.assert_close(seg[0], seg_ref[0])


def test_from_plan_with_the_small_preset():
    plan = quiz_plan("small")
    net = ResEncUNet.from_plan(plan)
    assert net.arch["features_per_stage"] == plan.features_per_stage == [16, 32, 64, 128, 128]
    assert net.arch["strides"] == plan.strides and net.arch["kernel_sizes"] == plan.kernel_sizes
    assert [len(stage) for stage in net.encoder] == plan.n_blocks_per_stage
    shape = tuple(2 * d for d in net.divisor)  # a 2 x 2 x 2 bottleneck: the smallest InstanceNorm trains on
    out = net(torch.randn(1, 1, *shape))
    assert out.seg_logits[0].shape == (1, 3, *shape) and len(out.seg_logits) == plan.num_stages - 1


def test_resenc_m_quiz_plan_has_about_102m_parameters():
    plan = quiz_plan("M")
    assert plan.patch_size == (64, 128, 192)
    with torch.device("meta"):  # sizes only: no memory, no forward
        net = ResEncUNet.from_plan(plan)
    assert count_parameters(net) == 102_268_079  # = dynamic-network-architectures' (test_nnunet_parity)


# heads


@pytest.mark.parametrize("name", list(HEADS))
def test_head_output_shape_and_gradients_reach_the_encoder(image, name):
    net = tiny_net()
    head = HEADS[name](net.decoder_channels, 3, **head_values(name))  # as conf/model/head/ configures it
    logits = head(net(image), image=image)
    assert logits.shape == (2, 3)
    logits.square().sum().backward()
    assert net.stem.conv.weight.grad is not None and net.stem.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    probabilities = head.probabilities(logits.detach())
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))


@pytest.mark.parametrize("name", list(HEADS))
def test_head_works_on_a_patch_without_lesion(image, name):
    net = tiny_net()
    out = net(image)
    seg = out.seg_logits[0].clone()
    seg[:, 2] = -1e4  # the network sees no lesion anywhere
    no_lesion = UNetOutput([seg] + out.seg_logits[1:], out.decoder_features, out.bottleneck)
    head = HEADS[name](net.decoder_channels, 3, **head_values(name))
    logits = head(no_lesion, image=image)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_ovr_head_is_for_binary_cross_entropy():
    head = OneVsRestHead([8, 4], 3, **head_values("ovr"))
    assert head.loss_kind == "bce" and MultiStageHead([8, 4], 3, **head_values("multistage")).loss_kind == "ce"
    probabilities = head.probabilities(torch.tensor([[0.0, 0.0, 0.0], [10.0, -10.0, -10.0]]))
    torch.testing.assert_close(probabilities[0], torch.full((3,), 1 / 3))
    assert probabilities[1, 0] > 0.99


def test_heads_reject_bad_knobs():
    with pytest.raises(ValueError, match="pooling"):
        SingleStageHead([8, 4], 3, **head_values("single_stage", pool="median"))
    with pytest.raises(ValueError, match="at least 2 subtypes"):
        MultiStageHead([8, 4], 1, **head_values("multistage"))
    with pytest.raises(IndexError):
        SingleStageHead([8, 4], 3, **head_values("single_stage", stage=2))
    with pytest.raises(TypeError, match="region"):  # no knob has a default: conf/model/head/ holds them
        SingleStageHead([8, 4], 3, **{k: v for k, v in head_values("single_stage").items() if k != "region"})


# multi-task wrapper and configs


def test_multitask_forward_and_segmentation_only(image):
    net = tiny_net()
    model = MultiTaskNet(net, MultiStageHead(net.decoder_channels, 3, **head_values("multistage"))).eval()
    with torch.no_grad():
        seg, logits = model(image)
        seg_only = model.backbone(image, deep_supervision=False).seg_logits
    assert len(seg) == 3 and logits.shape == (2, 3) and model.loss_kind == "ce"
    assert len(seg_only) == 1
    torch.testing.assert_close(seg_only[0], seg[0])
    segmentation_net = MultiTaskNet(net, None)
    assert segmentation_net(image)[1] is None and segmentation_net.loss_kind is None


def test_segmentation_only_runs_in_monai_sliding_window():
    from monai.inferers import sliding_window_inference

    model = MultiTaskNet(tiny_net(), None).eval()
    volume = torch.randn(1, 1, 16, 48, 40)

    def full_resolution(x):  # MONAI stitches spatial outputs only: the segmentation logits
        return model.backbone(x, deep_supervision=False).seg_logits[0]

    with torch.no_grad():
        logits = sliding_window_inference(volume, PATCH, 4, full_resolution, overlap=0.5, mode="gaussian")
    assert logits.shape == (1, 3, 16, 48, 40)


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base="1.3"):
        return compose(config_name="default", overrides=list(overrides))


@pytest.mark.parametrize("head", ["none", *HEADS, "multistage_paper"])
def test_build_model_from_every_head_config(head, image):
    cfg = compose_model(f"head={head}")
    model = build_model(cfg, tiny_plan())
    assert model.backbone.deep_supervision is True
    if head == "none":
        assert model.head is None
        return
    assert type(model.head) is HEADS.get(head, MultiStageHead)
    # PANDA's own head pools the whole patch; ours pool where the network sees the lesion
    assert model.head.region_guide.region == ("patch" if head == "multistage_paper" else "lesion")
    assert model.head.decoder_channels == model.backbone.decoder_channels
    seg, logits = model(image)
    assert logits.shape == (2, 3) and len(seg) == 3


def test_default_model_config_and_overrides():
    cfg = compose_model()
    assert cfg.head._target_.endswith("MultiStageHead") and cfg.backbone._target_.endswith("ResEncUNet.from_plan")
    plan = tiny_plan()
    plan.labels = {"background": 0, "lesion": 1, "pancreas": 2}
    model = build_model(compose_model("head=lesion_attention", "head.dropout=0.5",
                                      "backbone.deep_supervision=false"), plan)
    assert model.head.lesion_channel == 1  # from the plan's labels
    assert model.head.classifier[0].p == 0.5 and model.backbone.deep_supervision is False


def test_build_model_needs_subtypes_for_a_head():
    plan = tiny_plan()
    plan.num_subtypes = 0
    with pytest.raises(ValueError, match="model/head=none"):
        build_model(compose_model(), plan)
    assert build_model(compose_model("head=none"), plan).head is None
