"""Parity with nnU-Net v2's ResidualEncoderUNet (dynamic-network-architectures) and its model folders.

dynamic-network-architectures is a dev-only dependency, installed without its dependencies
(``pip install --no-deps dynamic-network-architectures einops``: its plain install pulls timm,
torchvision and a CUDA torch).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import pydoc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pancreas_mtl.models import ResEncUNet, count_parameters
from pancreas_mtl.models.nnunet_io import export_nnunet_model_folder, load_nnunet_model_folder
from pancreas_mtl.models.nnunet_plans import RESAMPLING_KWARGS, architecture_from_model, plan_from_nnunet
from pancreas_mtl.models.nnunet_weights import (
    NnUNetFormatError,
    load_nnunet_state_dict,
    nnunet_key_aliases,
    to_nnunet_state_dict,
)
from tests.test_models import quiz_fingerprint, quiz_plan, tiny_plan

pytest.importorskip("dynamic_network_architectures")

PATCH = (16, 32, 32)



def parity_plan():
    """5 stages, the quiz's anisotropic first stage, 2 decoder convs at one stage."""
    plan = tiny_plan(features=(8, 16, 32, 64, 64), patch_size=PATCH)
    plan.n_blocks_per_stage = [1, 2, 2, 2, 2]
    plan.n_conv_per_stage_decoder = [1, 2, 1, 1]
    return plan


def nnunet_network(architecture: dict, in_channels: int, num_classes: int, deep_supervision: bool):
    """nnU-Net's get_network_from_plans: import the named classes, build, apply ``initialize``."""
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(architecture["network_class_name"])
    network = network_class(input_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                            **kwargs)
    network.apply(network.initialize)
    return network


def randomize_(network: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (the initialisation zeroes biases and half the norms)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if parameter.dim() > 1:
                continue  # conv weights keep their He initialisation
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)


def max_difference(ours: list[torch.Tensor], theirs) -> float:
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))


# architecture


@pytest.mark.parametrize("plan_name", ["quiz_M", "quiz_small", "parity"])
def test_parameter_count_and_keys_equal_dynamic_network_architectures(plan_name):
    plan = {"quiz_M": lambda: quiz_plan("M"), "quiz_small": lambda: quiz_plan("small"), "parity": parity_plan}[plan_name]()
    with torch.device("meta"):  # construction only
        ours = ResEncUNet.from_plan(plan)
        theirs = nnunet_network(architecture_from_model(ours), plan.num_input_channels, plan.num_classes, True)
    assert count_parameters(ours) == count_parameters(theirs)
    if plan_name == "quiz_M":
        assert count_parameters(ours) == 102_268_079
    aliases = nnunet_key_aliases(ours)
    assert {name for names in aliases.values() for name in names} == set(theirs.state_dict())


def test_initialisation_zeroes_the_same_tensors():
    ours = ResEncUNet.from_plan(parity_plan())
    theirs = nnunet_network(architecture_from_model(ours), 1, 3, True)
    their_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        other = their_state[nnunet_key_aliases(ours)[key][0]]
        assert bool(torch.count_nonzero(tensor)) == bool(torch.count_nonzero(other)), key


# logits


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_logits_match_with_weights_copied_both_ways(image, deep_supervision):
    plan = parity_plan()
    torch.manual_seed(0)
    ours = ResEncUNet.from_plan(plan, deep_supervision=deep_supervision).eval()
    theirs = nnunet_network(architecture_from_model(ours), 1, 3, deep_supervision).eval()

    randomize_(theirs, seed=1)
    load_nnunet_state_dict(ours, theirs.state_dict())  # nnU-Net -> ours
    with torch.no_grad():
        difference = max_difference(ours(image).seg_logits, theirs(image))
    assert difference < 1e-4

    randomize_(ours, seed=2)
    theirs.load_state_dict(to_nnunet_state_dict(ours))  # ours -> nnU-Net, strict
    with torch.no_grad():
        reference = ours(image).seg_logits
        difference = max_difference(reference, theirs(image))
    assert difference < 1e-4
    assert len(reference) == (plan.num_stages - 1 if deep_supervision else 1)
    assert reference[0].abs().max() > 1.0  # the comparison is not between zeros


def test_weights_with_wrapper_prefixes_load_and_bad_weights_are_named():
    ours = ResEncUNet.from_plan(parity_plan())
    weights = {f"_orig_mod.{k}": v for k, v in to_nnunet_state_dict(ours).items()}
    load_nnunet_state_dict(ours, weights)  # saved from a torch.compile'd network
    weights = dict(to_nnunet_state_dict(ours))
    weights.pop("decoder.seg_layers.0.weight")
    weights["decoder.transpconvs.0.bias"] = torch.zeros(7)
    weights["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(NnUNetFormatError, match=r"1 missing: decoder\.seg_layers\.0\.weight.*"
                                                r"transpconvs\.0\.bias: expected \(64,\), found \(7,\).*"
                                                r"1 unexpected: decoder\.extra\.weight"):
        load_nnunet_state_dict(ours, weights)


# model folders


def export_folder(tmp_path: Path, seed: int = 3) -> tuple[ResEncUNet, Path]:
    plan = parity_plan()
    ours = ResEncUNet.from_plan(plan).eval()
    randomize_(ours, seed=seed)
    return ours, export_nnunet_model_folder(ours, plan, tmp_path / "model", fingerprint=quiz_fingerprint())


def test_export_then_load_round_trip(tmp_path, image):
    ours, folder = export_folder(tmp_path)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    loaded, info = load_nnunet_model_folder(folder, fold=0)
    assert info.trainer_name == "nnUNetTrainer" and info.configuration == "3d_fullres"
    assert info.inference_allowed_mirroring_axes == (0, 1, 2)
    assert loaded.deep_supervision is False
    plan = parity_plan()
    for field in ("target_spacing", "patch_size", "batch_size", "normalization", "kernel_sizes", "strides",
                  "features_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder", "num_input_channels",
                  "num_classes", "labels"):
        assert getattr(info.plan, field) == getattr(plan, field), field
    assert info.plans["foreground_intensity_properties_per_channel"]["0"]["max"] == 3071.0
    assert info.plans["original_median_spacing_after_transp"] == [2.0, 0.7363, 0.7363]
    assert info.dataset_json == {"channel_names": {"0": "CT"}, "labels": plan.labels, "numTraining": 40,
                                 "file_ending": ".nii.gz"}
    with torch.no_grad():
        assert max_difference(loaded(image).seg_logits, ours(image, deep_supervision=False).seg_logits) == 0.0


def test_exported_folder_loads_the_way_nnunets_predictor_does(tmp_path, image):
    """nnUNetPredictor.initialize_from_trained_model_folder, without nnunetv2: read the checkpoint, build
    the architecture named in plans.json without deep supervision, load_state_dict (strict)."""
    ours, folder = export_folder(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    configuration = checkpoint["init_args"]["configuration"]
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    architecture = plans["configurations"][configuration]["architecture"]
    theirs = nnunet_network(architecture, len(dataset_json["channel_names"]), len(dataset_json["labels"]), False)
    theirs.load_state_dict(checkpoint["network_weights"])
    with torch.no_grad():
        assert max_difference(ours(image, deep_supervision=False).seg_logits, theirs.eval()(image)) < 1e-4
    assert plan_from_nnunet(plans, dataset_json).patch_size == PATCH


def nnunet_training_checkpoint(folder: Path, network: torch.nn.Module, numpy_1_names: bool = False) -> None:
    """Rewrite fold_0/checkpoint_final.pth the way nnUNetTrainer.save_checkpoint does: optimizer state,
    a training log of numpy scalars, the init args with a torch.device."""
    plans = json.loads((folder / "plans.json").read_text())
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    network(torch.randn(1, 1, *PATCH)).seg_logits[0].mean().backward()
    optimizer.step()
    log = {"mean_fg_dice": [np.float64(0.41), np.float64(0.52)], "ema_fg_dice": [np.float64(0.41), np.float64(0.42)],
           "dice_per_class_or_region": [[np.float64(0.8), np.float32(0.1)]] * 2,
           "train_losses": [np.float64(-0.2)] * 2, "val_losses": [np.float32(-0.1)] * 2, "lrs": [0.01, 0.0099],
           "epoch_start_timestamps": [1.7e9] * 2, "epoch_end_timestamps": [1.7e9 + 90] * 2}
    checkpoint = {"network_weights": to_nnunet_state_dict(network), "optimizer_state": optimizer.state_dict(),
                  "grad_scaler_state": None, "logging": log, "_best_ema": np.float64(0.42), "current_epoch": 2,
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": {},
                                "device": torch.device("cuda")},
                  "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    if numpy_1_names:  # numpy < 2 pickles its scalars as numpy.core.multiarray.scalar
        source, data = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
        with zipfile.ZipFile(data, "w", zipfile.ZIP_STORED) as target:
            for item in source.infolist():
                content = source.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    assert b"numpy._core.multiarray" in content
                    content = content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                target.writestr(item, content)
        data = data.getvalue()
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(data)


@pytest.mark.parametrize("numpy_1_names", [False, True])
def test_nnunet_training_checkpoints_load_with_weights_only(tmp_path, image, numpy_1_names):
    ours, folder = export_folder(tmp_path)
    nnunet_training_checkpoint(folder, ours.train(), numpy_1_names)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only needs the numpy allowlist
        torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    loaded, info = load_nnunet_model_folder(folder)
    assert info.trainer_name == "nnUNetTrainer"
    with torch.no_grad():
        reference = ours.eval()(image, deep_supervision=False).seg_logits
        assert max_difference(loaded(image).seg_logits, reference) == 0


def test_checkpoints_with_other_objects_are_refused(tmp_path):
    _, folder = export_folder(tmp_path)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    checkpoint["init_args"]["namespace"] = argparse.Namespace(fold=0)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(NnUNetFormatError, match=r"weights_only=True.*argparse\.Namespace"):
        load_nnunet_model_folder(folder)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(network_class_name="dynamic_network_architectures.architectures.unet.ResidualUNet"),
     "ResidualUNet.*is not supported"),
    (lambda a: a["arch_kwargs"].update(nonlin="torch.nn.ReLU"), "nonlin 'torch.nn.ReLU', expected LeakyReLU"),
    (lambda a: a["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv2d"), "expected Conv3d"),
    (lambda a: a["arch_kwargs"].update(dropout_op="torch.nn.Dropout3d", dropout_op_kwargs={"p": 0.2}), "dropout"),
    (lambda a: a["arch_kwargs"].update(n_blocks_per_stage=[1, 2]), "n_blocks_per_stage.*2 entries, expected 5"),
    (lambda a: a["arch_kwargs"].update(squeeze_excitation=True), "unknown.*squeeze_excitation"),
])
def test_unsupported_architectures_are_named(tmp_path, change, message):
    _, folder = export_folder(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    change(plans["configurations"]["3d_fullres"]["architecture"])
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnUNetFormatError, match=message):
        load_nnunet_model_folder(folder)


def test_export_takes_a_multitask_network_and_leaves_its_head_out(tmp_path, image):
    from pancreas_mtl.models import MultiStageHead, MultiTaskNet
    from tests.conf_values import head_values

    plan = parity_plan()
    backbone = ResEncUNet.from_plan(plan).eval()
    randomize_(backbone, seed=4)
    model = MultiTaskNet(backbone, MultiStageHead(backbone.decoder_channels, 3, **head_values("multistage")))
    loaded, _ = load_nnunet_model_folder(export_nnunet_model_folder(model, plan, tmp_path / "model"))
    with torch.no_grad():
        assert max_difference(loaded(image).seg_logits, backbone(image, deep_supervision=False).seg_logits) == 0


def test_export_refuses_a_network_that_differs_from_the_plan(tmp_path):
    plan = parity_plan()
    other = ResEncUNet.from_plan(tiny_plan())
    with pytest.raises(ValueError, match="features_per_stage"):
        export_nnunet_model_folder(other, plan, tmp_path / "model")


def test_anisotropy_threshold_round_trips_through_plans_json(tmp_path):
    """The plan's separate-axis threshold is nnU-Net's separate_z_anisotropy_threshold of its resampling
    functions: written when it is not nnU-Net's default 3, read back, and one value for all three."""
    plan = parity_plan()
    network = ResEncUNet.from_plan(plan)
    default = export_nnunet_model_folder(network, plan, tmp_path / "default")
    config = json.loads((default / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert all("separate_z_anisotropy_threshold" not in config[key] for key in RESAMPLING_KWARGS)
    assert load_nnunet_model_folder(default)[1].plan.anisotropy_threshold == 3.0

    plan.anisotropy_threshold = 2.5
    folder = export_nnunet_model_folder(network, plan, tmp_path / "lower")
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert all(config[key]["separate_z_anisotropy_threshold"] == 2.5 for key in RESAMPLING_KWARGS)
    loaded = load_nnunet_model_folder(folder)[1].plan
    assert loaded.anisotropy_threshold == 2.5 and loaded.anisotropic_axis == 0   # 2.0 / 0.75 mm = 2.7
    config["resampling_fn_seg_kwargs"]["separate_z_anisotropy_threshold"] = 3.0
    with pytest.raises(NnUNetFormatError, match="separate_z_anisotropy_threshold differs"):
        plan_from_nnunet(plans, json.loads((folder / "dataset.json").read_text()))
