"""nnU-Net's default PlainConvUNet: parity with dynamic-network-architectures' PlainConvUNet (sizes, weight names,
logits, memory estimate), nnU-Net model folders holding one, the plainconv planning preset, the backbone config
with every head, the plan/backbone network check, and prediction."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pancreas_mtl.inference.predictor import Predictor
from pancreas_mtl.models import PlainConvUNet, ResEncUNet, build_model, count_parameters
from pancreas_mtl.models.nnunet_io import export_nnunet_model_folder, load_nnunet_model_folder
from pancreas_mtl.models.nnunet_plans import architecture_from_model, nnunet_dataset_json, nnunet_plans
from pancreas_mtl.models.nnunet_weights import (
    NnUNetFormatError,
    load_nnunet_state_dict,
    nnunet_key_aliases,
    to_nnunet_state_dict,
)
from pancreas_mtl.planning.plan import Plan, PlanError
from pancreas_mtl.planning.planner import describe_plan, estimate_feature_map_voxels, load_preset, plan_experiment
from pancreas_mtl.planning.topology import conv_and_pool_topology, plainconv_feature_map_voxels
from tests.conf_values import train_node
from tests.predict_helpers import settings
from tests.test_models import quiz_fingerprint, quiz_plan, tiny_plan
from tests.test_nnunet_parity import PATCH, max_difference, nnunet_network, randomize_

pytest.importorskip("dynamic_network_architectures")

CONF = Path(__file__).resolve().parents[1] / "conf"
HEADS = sorted(p.stem for p in (CONF / "model" / "head").glob("*.yaml"))


def backbone_values(**changes) -> dict:
    """conf/model/backbone/plainconv.yaml's knobs (PlainConvUNet.from_plan has no defaults)."""
    return train_node("model.backbone", "model/backbone=plainconv", **changes)


def plainconv_plan(**changes) -> Plan:
    """5 stages with the quiz's anisotropic first stage; a different conv count per stage, both ways."""
    plan = tiny_plan(features=(8, 16, 32, 64, 64), patch_size=PATCH)
    plan.network = "plainconv"
    plan.n_blocks_per_stage = [2, 1, 3, 2, 2]
    plan.n_conv_per_stage_decoder = [2, 1, 2, 1]
    return dataclasses.replace(plan, **changes)


def plainconv_net(plan: Plan | None = None, **changes) -> PlainConvUNet:
    return PlainConvUNet.from_plan(plan or plainconv_plan(), **backbone_values(**changes))


def model_config(head: str, backbone: str = "plainconv") -> dict:
    """conf/model composed for a head and backbone, as train.py composes it."""
    return train_node("model", f"model/head={head}", f"model/backbone={backbone}")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))


# --- architecture -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan_name", ["tiny", "quiz_plainconv"])
def test_parameter_count_and_keys_equal_dynamic_network_architectures(plan_name):
    plan = plainconv_plan() if plan_name == "tiny" else quiz_plan("plainconv")
    with torch.device("meta"):  # construction only
        ours = plainconv_net(plan)
        theirs = nnunet_network(architecture_from_model(ours), plan.num_input_channels, plan.num_classes, True)
    assert type(theirs).__name__ == "PlainConvUNet"
    assert count_parameters(ours) == count_parameters(theirs)
    if plan_name == "quiz_plainconv":
        assert count_parameters(ours) == 31_113_903  # nnU-Net's default 3d_fullres network is about 31 M
    aliases = nnunet_key_aliases(ours)
    assert {name for names in aliases.values() for name in names} == set(theirs.state_dict())
    assert list(ours.state_dict())[0] == "encoder.0.0.conv.weight"
    assert ours.state_dict()["encoder.0.0.conv.weight"].shape[1] == plan.num_input_channels
    assert not any(key.startswith("stem.") for key in ours.state_dict())


def test_layout_and_initialisation():
    net = plainconv_net()
    assert net.network == "plainconv" and ResEncUNet.network == "resenc"
    assert [len(stage) for stage in net.encoder] == [2, 1, 3, 2, 2]
    assert [len(stage.convs) for stage in net.decoder] == [2, 1, 2, 1]
    first = [stage[0].conv for stage in net.encoder]  # the first conv of each stage is strided
    assert [c.stride for c in first] == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert all(conv.conv.stride == (1, 1, 1) for stage in net.encoder for conv in list(stage)[1:])
    assert (net.divisor, net.decoder_channels, net.bottleneck_channels) == ((8, 16, 16), [64, 32, 16, 8], 64)
    for name, parameter in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(parameter) == 0, name
        if ".norm.weight" in name:
            assert torch.all(parameter == 1), name
    weight = net.encoder[2][1].conv.weight  # He (a=0.01): std sqrt(2 / (1 + 0.01^2) / fan_in)
    assert weight.std().item() == pytest.approx((2 / (1 + 1e-4) / weight[0].numel()) ** 0.5, rel=0.15)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="PlainConvUNet needs at least 2 stages"):
        plainconv_net(plainconv_plan(strides=[(1, 1, 1)] * 3))
    with pytest.raises(ValueError, match="at least one block"):
        plainconv_net(plainconv_plan(n_blocks_per_stage=[2, 0, 2, 2, 2]))


# --- logits -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep_supervision", [True, False])
def test_logits_match_with_weights_copied_both_ways(image, deep_supervision):
    torch.manual_seed(0)
    ours = plainconv_net(deep_supervision=deep_supervision).eval()
    theirs = nnunet_network(architecture_from_model(ours), 1, 3, deep_supervision).eval()

    randomize_(theirs, seed=1)
    load_nnunet_state_dict(ours, theirs.state_dict())  # nnU-Net -> ours
    with torch.no_grad():
        assert max_difference(ours(image).seg_logits, theirs(image)) < 1e-4

    randomize_(ours, seed=2)
    theirs.load_state_dict(to_nnunet_state_dict(ours))  # ours -> nnU-Net, strict
    with torch.no_grad():
        reference = ours(image).seg_logits
        assert max_difference(reference, theirs(image)) < 1e-4
    assert len(reference) == (4 if deep_supervision else 1)
    assert reference[0].shape == (2, 3, *PATCH)
    assert reference[0].abs().max() > 1.0  # the comparison is not between zeros


# --- nnU-Net model folders ----------------------------------------------------------------------------------

def their_model_folder(folder: Path, plan: Plan, num_classes: int | None = None, seed: int = 5) -> torch.nn.Module:
    """An nnU-Net v2 training output for ``plan``: plans.json, dataset.json and fold_0/checkpoint_final.pth as
    nnUNetTrainer.save_checkpoint writes it, holding the state dict of dynamic-network-architectures'
    PlainConvUNet (randomised, after one optimizer step); ``num_classes``: the checkpoint's network has
    another label count than dataset.json. Returns their network."""
    plans, dataset_json = nnunet_plans(plainconv_net(plan), plan), nnunet_dataset_json(plan)
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    theirs = nnunet_network(architecture, plan.num_input_channels, num_classes or plan.num_classes, True)
    randomize_(theirs, seed=seed)
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    theirs(torch.randn(1, 1, *plan.patch_size))[0].mean().backward()
    optimizer.step()
    checkpoint = {"network_weights": theirs.state_dict(), "optimizer_state": optimizer.state_dict(),
                  "grad_scaler_state": None, "logging": {"mean_fg_dice": [np.float64(0.41)]},
                  "_best_ema": np.float64(0.42), "current_epoch": 1,
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                                "dataset_json": dataset_json, "device": torch.device("cuda")},
                  "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(buffer.getvalue())
    return theirs


def test_their_model_folder_loads_and_predicts_the_same(tmp_path, image):
    plan = plainconv_plan()
    theirs = their_model_folder(tmp_path / "model", plan).eval()
    loaded, info = load_nnunet_model_folder(tmp_path / "model")
    assert type(loaded) is PlainConvUNet and loaded.deep_supervision is False
    assert info.plan.network == "plainconv" and info.plans["plans_name"] == "pancreas_mtl_tiny"
    for field in ("kernel_sizes", "strides", "features_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder",
                  "patch_size", "target_spacing", "normalization"):
        assert getattr(info.plan, field) == getattr(plan, field), field
    theirs.decoder.deep_supervision = False
    with torch.no_grad():
        assert max_difference(loaded(image).seg_logits, theirs(image)) < 1e-4


def test_their_weights_for_another_label_count_are_refused(tmp_path):
    their_model_folder(tmp_path / "model", plainconv_plan(), num_classes=5)
    with pytest.raises(NnUNetFormatError, match=r"checkpoint_final\.pth: the weights do not fit the PlainConvUNet "
                                                 r"the plans describe; 8 with another shape: decoder\.seg_layers\.0"
                                                 r"\.weight: expected \(3, 64, 1, 1, 1\), found \(5, 64, 1, 1, 1\)"):
        load_nnunet_model_folder(tmp_path / "model")


def test_export_then_load_round_trip(tmp_path, image):
    plan = plainconv_plan()
    ours = plainconv_net(plan).eval()
    randomize_(ours, seed=4)
    folder = export_nnunet_model_folder(ours, plan, tmp_path / "model")
    plans = json.loads((folder / "plans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"].endswith("unet.PlainConvUNet")
    assert architecture["arch_kwargs"]["n_conv_per_stage"] == [2, 1, 3, 2, 2]
    loaded, info = load_nnunet_model_folder(folder)
    with torch.no_grad():
        assert max_difference(loaded(image).seg_logits, ours(image, deep_supervision=False).seg_logits) == 0.0
    with pytest.raises(ValueError, match="network plainconv .PlainConvUNet., plan resenc"):
        export_nnunet_model_folder(ours, dataclasses.replace(plan, network="resenc"), tmp_path / "other")


def test_a_plainconv_architecture_must_be_nnunets_default(tmp_path):
    plan = plainconv_plan()
    folder = export_nnunet_model_folder(plainconv_net(plan), plan, tmp_path / "model")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin_first"] = True
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnUNetFormatError, match="PlainConvUNet kwargs differ from ours: nonlin_first"):
        load_nnunet_model_folder(folder)


# --- planning -----------------------------------------------------------------------------------------------

def test_plainconv_preset_plans_the_quiz_like_nnunets_default_planner():
    """nnU-Net's ExperimentPlanner on the quiz's median case (60 x 119 x 184 voxels at 2 x 0.7363 x 0.7363 mm):

    - spacing: the median; z is 2.7x coarser than y/x, under the anisotropy threshold of 3: no 10th percentile.
    - initial patch: 256^3 voxels shaped like 1/spacing is about 131 x 357 x 357, clipped to the median shape.
    - topology (get_pool_and_conv_props, featuremap_min_edge_length 4): y/x pool first (z at 2 mm is more
      than twice their spacing, and gets 1 x 3 x 3 kernels), then all axes from stage 2 (z now within a factor 2),
      until y would drop below 8: strides 1,(1,2,2),2,2,2,2 (6 stages, divisor 16 x 32 x 32), the patch padded
      to 64 x 128 x 192, the bottleneck 4 x 4 x 6 with a 3 x 3 x 3 kernel.
    - features 32 * 2^s capped at 320; 2 convs per encoder and decoder stage.
    - memory: PlainConvUNet.compute_conv_feature_map_size of that patch is 422,817,792 < 560,000,000 (the 3d
      reference at 8 GB), so the patch is not shrunk; batch round(560e6 / 422.8e6 * 2) = 3, capped at 5% of the
      dataset: round(40 cases x 60 x 119 x 184 x 0.05 / (64 x 128 x 192)) = round(1.67) = 2, and at least 2.
    """
    plan = quiz_plan("plainconv")
    assert plan.network == "plainconv" and plan.preset == "plainconv"
    assert plan.target_spacing == (2.0, 0.7363, 0.7363) and plan.median_shape == (60, 119, 184)
    assert plan.patch_size == (64, 128, 192) and plan.batch_size == 2
    assert plan.strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert plan.kernel_sizes == [(1, 3, 3)] + [(3, 3, 3)] * 5
    assert plan.features_per_stage == [32, 64, 128, 256, 320, 320]
    assert plan.n_blocks_per_stage == [2] * 6 and plan.n_conv_per_stage_decoder == [2] * 5
    topology = conv_and_pool_topology(plan.target_spacing, plan.patch_size, 4, None)
    assert estimate_feature_map_voxels(topology, load_preset("plainconv"), plan.num_classes) == 422_817_792
    assert "network plainconv" in describe_plan(plan) and "convs" in describe_plan(plan)
    assert plan_experiment(quiz_fingerprint(), load_preset("M")).network == "resenc"


@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("plan_name", ["tiny", "quiz_plainconv"])
def test_memory_estimate_is_plainconvunets_feature_map_size(plan_name, deep_supervision):
    plan = plainconv_plan() if plan_name == "tiny" else quiz_plan("plainconv")
    with torch.device("meta"):
        theirs = nnunet_network(architecture_from_model(plainconv_net(plan)), 1, plan.num_classes, deep_supervision)
    ours = plainconv_feature_map_voxels(plan.patch_size, plan.strides, plan.features_per_stage,
                                        plan.n_blocks_per_stage, plan.n_conv_per_stage_decoder, plan.num_classes,
                                        deep_supervision=deep_supervision)
    assert ours == int(theirs.compute_conv_feature_map_size(plan.patch_size))


def test_presets_name_their_network():
    assert {name: load_preset(name)["network"] for name in ("M", "L", "small", "plainconv")} == {
        "M": "resenc", "L": "resenc", "small": "resenc", "plainconv": "plainconv"}
    with pytest.raises(ValueError, match="network 'unet' is not one of"):
        plan_experiment(quiz_fingerprint(), load_preset("small"), {"network": "unet"})


def test_plans_keep_their_network_and_older_plans_read_as_resenc():
    plan = plainconv_plan()
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    older = plan.to_dict()
    del older["network"]
    assert Plan.from_dict(older).network == "resenc"
    with pytest.raises(PlanError, match="plan.json: plan field network: expected one of"):
        Plan.from_dict({**plan.to_dict(), "network": "unet"}, source="plan.json")


# --- the backbone config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_every_head_builds_on_a_plainconv_backbone(head, image):
    model = build_model(model_config(head), plainconv_plan())
    assert type(model.backbone) is PlainConvUNet and model.backbone.deep_supervision is True
    seg, logits = model(image)
    assert len(seg) == 4 and seg[0].shape == (2, 3, *PATCH)
    if head == "none":
        assert model.head is None and logits is None
    else:
        assert model.head.decoder_channels == model.backbone.decoder_channels
        assert logits.shape == (2, 3)


def test_a_backbone_for_another_network_than_the_plan_is_refused():
    with pytest.raises(ValueError, match=r"builds a resenc network \(ResEncUNet\), but the plan \(preset tiny\) is "
                                         r"for a plainconv network.*model/backbone=plainconv with planning=plainconv"):
        build_model(model_config("single_stage", backbone="resenc"), plainconv_plan())
    older = tiny_plan().to_dict()
    del older["network"]  # a plan written before the field: a ResEnc plan
    with pytest.raises(ValueError, match=r"builds a plainconv network \(PlainConvUNet\), but the plan .* resenc"):
        build_model(model_config("single_stage"), Plan.from_dict(older))


# --- prediction ---------------------------------------------------------------------------------------------

def test_predictor_runs_a_plainconv_network():
    plan = plainconv_plan(patch_size=(8, 16, 16), features_per_stage=[4, 8, 8], kernel_sizes=[(1, 3, 3), (3, 3, 3),
                          (3, 3, 3)], strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)], n_blocks_per_stage=[2, 2, 2],
                          n_conv_per_stage_decoder=[2, 2])
    torch.manual_seed(0)
    network = build_model(model_config("single_stage"), plan).eval()
    case = torch.randn(1, 11, 30, 21)  # not a multiple of the window: padded and cropped back
    prediction = Predictor([network], plan, settings(roi_size=(8, 16, 16)), device="cpu").predict_preprocessed(case)
    assert prediction.probabilities.shape == (3, 11, 30, 21)
    torch.testing.assert_close(prediction.probabilities.sum(0), torch.ones(11, 30, 21))
    assert prediction.subtype_probabilities.shape == (3,)
