"""nnU-Net v2 plans and architectures: ``plans.json`` / ``dataset.json`` to our :class:`Plan` and back, and
dynamic-network-architectures' ``ResidualEncoderUNet`` / ``PlainConvUNet`` arguments to and from our
:class:`ResEncUNet` / :class:`PlainConvUNet`.

Formats are those of nnunetv2 >= 2.4:
``plans['configurations'][c]['architecture'] = {network_class_name, arch_kwargs, _kw_requires_import}``.
nnU-Net's arrays are (z, y, x) like ours when ``transpose_forward`` is [0, 1, 2], the only order
accepted here. The model folders themselves (checkpoints, folds) are :mod:`pancreas_mtl.models.nnunet_io`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from pancreas_mtl.models.nnunet_weights import NNUNET_CLASS_NAMES, NnUNetFormatError
from pancreas_mtl.models.plainconv_unet import PlainConvUNet
from pancreas_mtl.models.resenc_unet import ResEncUNet, UNetBackbone
from pancreas_mtl.planning.anisotropy import ANISOTROPY_THRESHOLD
from pancreas_mtl.planning.plan import ChannelNormalization, Fingerprint, Plan

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PLAINCONV_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
# our backbone class of each network kind (Plan.network)
BACKBONES: dict[str, type[UNetBackbone]] = {"resenc": ResEncUNet, "plainconv": PlainConvUNet}
CONV3D = ("torch.nn.modules.conv.Conv3d", "torch.nn.Conv3d")
INSTANCENORM3D = ("torch.nn.modules.instancenorm.InstanceNorm3d", "torch.nn.InstanceNorm3d")
LEAKYRELU = ("torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU")
COMMON_ARCH_KWARGS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                      "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                      "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision"}
ARCH_KWARGS = COMMON_ARCH_KWARGS | {"n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"}
PLAINCONV_ARCH_KWARGS = COMMON_ARCH_KWARGS | {"n_conv_per_stage", "nonlin_first"}
# the arch_kwargs entry holding our n_blocks_per_stage, per network
ENCODER_PER_STAGE = {"resenc": "n_blocks_per_stage", "plainconv": "n_conv_per_stage"}
NORMALIZATION_NAMES = {"ct": "CTNormalization", "zscore": "ZScoreNormalization"}
RESAMPLING_KWARGS = ("resampling_fn_data_kwargs", "resampling_fn_seg_kwargs", "resampling_fn_probabilities_kwargs")


# ---------------------------------------------------------------------------------------------
# architecture: plans' arch_kwargs <-> our constructor

def _per_stage(value: Any, n_stages: int, what: str, triple: bool = False) -> list:
    """nnU-Net allows a scalar for "the same at every stage"; expand it and check the length."""
    if not isinstance(value, (list, tuple)):
        value = [value] * n_stages
    if triple:
        value = [tuple(int(v) for v in ([entry] * 3 if not isinstance(entry, (list, tuple)) else entry))
                 for entry in value]
    if len(value) != n_stages:
        raise NnUNetFormatError(f"arch_kwargs['{what}'] has {len(value)} entries, expected {n_stages} (n_stages)")
    return list(value)


def network_of_architecture(architecture: Mapping, source: str = "plans") -> str:
    """The network kind (Plan.network) of a plans configuration's ``architecture`` entry."""
    name = str(architecture.get("network_class_name", ""))
    for network, class_name in NNUNET_CLASS_NAMES.items():
        if name.split(".")[-1] == class_name:
            return network
    raise NnUNetFormatError(f"{source}: architecture {name!r} is not supported; only {RESENC_CLASS} (nnU-Net's "
                            f"ResEnc presets) and {PLAINCONV_CLASS} (its default planner) can be loaded")


def unet_kwargs_from_architecture(architecture: Mapping, in_channels: int, num_classes: int,
                                  source: str = "plans") -> tuple[str, dict]:
    """(network kind, constructor arguments of its backbone, ``BACKBONES[kind]``) from a plans configuration's
    ``architecture`` entry.

    Raises:
        NnUNetFormatError: when the architecture is not a 3D ResidualEncoderUNet with BasicBlockD blocks or
            PlainConvUNet, with InstanceNorm, LeakyReLU and no dropout, or its kwargs are inconsistent.
    """
    network = network_of_architecture(architecture, source)
    class_name = NNUNET_CLASS_NAMES[network]
    kw = dict(architecture.get("arch_kwargs", {}))
    unknown = sorted(set(kw) - (ARCH_KWARGS if network == "resenc" else PLAINCONV_ARCH_KWARGS))
    if unknown:
        raise NnUNetFormatError(f"{source}: unknown {class_name} arch_kwargs {unknown}: a {class_name} with them is "
                                "not supported")
    checks = [
        (kw.get("conv_op") in CONV3D, f"conv_op {kw.get('conv_op')!r}, expected Conv3d (3D only)"),
        (kw.get("norm_op") in INSTANCENORM3D, f"norm_op {kw.get('norm_op')!r}, expected InstanceNorm3d"),
        (kw.get("nonlin") in LEAKYRELU, f"nonlin {kw.get('nonlin')!r}, expected LeakyReLU"),
        (kw.get("dropout_op") is None or float((kw.get("dropout_op_kwargs") or {}).get("p", 0.0)) == 0.0,
         f"dropout_op {kw.get('dropout_op')!r} with {kw.get('dropout_op_kwargs')}, expected none"),
    ]
    if network == "resenc":
        checks += [
            (str(kw.get("block") or "BasicBlockD").split(".")[-1] == "BasicBlockD",
             f"block {kw.get('block')!r}, expected BasicBlockD"),
            (kw.get("bottleneck_channels") is None,
             f"bottleneck_channels {kw.get('bottleneck_channels')!r}, expected None"),
        ]
    else:
        checks.append((not kw.get("nonlin_first", False), "nonlin_first True, expected conv -> norm -> nonlin"))
    norm_kwargs = dict(kw.get("norm_op_kwargs") or {})
    checks += [(norm_kwargs.get("affine", True) is True, f"norm_op_kwargs {norm_kwargs}, expected affine=True"),
               (not norm_kwargs.get("track_running_stats", False),
                f"norm_op_kwargs {norm_kwargs}, expected no running statistics")]
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise NnUNetFormatError(f"{source}: {class_name} kwargs differ from ours: " + "; ".join(errors))

    n_stages = int(kw.get("n_stages", 0))
    features = [int(f) for f in _per_stage(kw.get("features_per_stage"), n_stages, "features_per_stage")]
    if kw.get("stem_channels") not in (None, features[0]):
        raise NnUNetFormatError(f"{source}: stem_channels {kw['stem_channels']} differs from features_per_stage[0] "
                                f"{features[0]}; only the default stem is supported")
    decoder = kw.get("n_conv_per_stage_decoder")
    decoder = [decoder] * (n_stages - 1) if not isinstance(decoder, (list, tuple)) else list(decoder)
    per_stage = ENCODER_PER_STAGE[network]
    return network, {
        "in_channels": int(in_channels), "num_classes": int(num_classes), "features_per_stage": features,
        "kernel_sizes": _per_stage(kw.get("kernel_sizes"), n_stages, "kernel_sizes", triple=True),
        "strides": _per_stage(kw.get("strides"), n_stages, "strides", triple=True),
        "n_blocks_per_stage": [int(n) for n in _per_stage(kw.get(per_stage), n_stages, per_stage)],
        "n_conv_per_stage_decoder": [int(n) for n in decoder],
        "conv_bias": bool(kw.get("conv_bias", False)),  # dynamic-network-architectures' default is False
        "norm_eps": float(norm_kwargs.get("eps", 1e-5)),
        "negative_slope": float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 1e-2)),
    }


def architecture_from_model(model: UNetBackbone) -> dict:
    """The plans ``architecture`` entry nnU-Net builds ``model``'s twin from (ResEncUNet: ResidualEncoderUNet,
    PlainConvUNet: PlainConvUNet)."""
    if type(model) not in BACKBONES.values():
        raise TypeError(f"expected a ResEncUNet or a PlainConvUNet, got {type(model).__name__}")
    arch = model.arch
    nonlin_kwargs: dict = {"inplace": True}
    if arch["negative_slope"] != 1e-2:
        nonlin_kwargs["negative_slope"] = arch["negative_slope"]
    return {
        "network_class_name": RESENC_CLASS if model.network == "resenc" else PLAINCONV_CLASS,
        "arch_kwargs": {
            "n_stages": len(arch["features_per_stage"]), "features_per_stage": list(arch["features_per_stage"]),
            "conv_op": CONV3D[0], "kernel_sizes": [list(k) for k in arch["kernel_sizes"]],
            "strides": [list(s) for s in arch["strides"]],
            ENCODER_PER_STAGE[model.network]: list(arch["n_blocks_per_stage"]),
            "n_conv_per_stage_decoder": list(arch["n_conv_per_stage_decoder"]), "conv_bias": arch["conv_bias"],
            "norm_op": INSTANCENORM3D[0], "norm_op_kwargs": {"eps": arch["norm_eps"], "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": LEAKYRELU[0], "nonlin_kwargs": nonlin_kwargs,
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


# ---------------------------------------------------------------------------------------------
# plans.json and dataset.json <-> Plan


def resolve_configuration(plans: Mapping, name: str, source: str) -> dict:
    """A configuration with nnU-Net's ``inherits_from`` applied (the child's keys win, shallowly)."""
    configurations = plans.get("configurations", {})
    chain, seen = [], set()
    while name is not None:
        if name not in configurations:
            raise NnUNetFormatError(f"{source}: no configuration {name!r} (found {sorted(configurations)})")
        if name in seen:
            raise NnUNetFormatError(f"{source}: configuration {name!r} inherits from itself")
        seen.add(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
    resolved: dict = {}
    for configuration in reversed(chain):
        resolved.update(configuration)
    if "architecture" not in resolved:
        raise NnUNetFormatError(f"{source}: configuration has no 'architecture' entry; plans written before "
                                "nnunetv2 2.4 are not supported")
    return resolved


def _labels(dataset_json: Mapping, source: str) -> dict[str, int]:
    labels = dataset_json.get("labels", {})
    if any(not isinstance(v, int) for v in labels.values()):
        raise NnUNetFormatError(f"{source}: region-based labels {labels} are not supported, expected one integer "
                                "per label")
    return {str(k): int(v) for k, v in labels.items()}


def _channel_names(dataset_json: Mapping) -> dict[str, str]:
    return dict(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def _anisotropy_threshold(config: Mapping, source: str) -> float:
    """The separate-axis threshold of a configuration's resampling functions (unset: nnU-Net's default).
    Our plan has one threshold for images, label maps and predictions, so they must agree."""
    found = {key: float((config.get(key) or {}).get("separate_z_anisotropy_threshold", ANISOTROPY_THRESHOLD))
             for key in RESAMPLING_KWARGS}
    if len(set(found.values())) > 1:
        raise NnUNetFormatError(f"{source}: separate_z_anisotropy_threshold differs between the resampling "
                                f"functions {found}; only one threshold for all of them is supported")
    return found[RESAMPLING_KWARGS[0]]


def plan_from_nnunet(plans: Mapping, dataset_json: Mapping, configuration: str = "3d_fullres",
                     source: str = "plans") -> Plan:
    """Our Plan of an nnU-Net plans configuration (no subtypes: nnU-Net has no classification)."""
    if list(plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise NnUNetFormatError(f"{source}: transpose_forward {plans['transpose_forward']} is not [0, 1, 2]; "
                                "only plans in (z, y, x) order are supported")
    config = resolve_configuration(plans, configuration, source)
    channels = _channel_names(dataset_json)
    labels = _labels(dataset_json, source)
    network, arch = unet_kwargs_from_architecture(config["architecture"], len(channels), len(labels), source)
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    normalization = []
    for channel, (scheme, use_mask) in enumerate(zip(config["normalization_schemes"], config["use_mask_for_norm"])):
        if scheme == "CTNormalization":
            stats = properties.get(str(channel))
            if stats is None:
                raise NnUNetFormatError(f"{source}: channel {channel} uses CTNormalization but plans have no "
                                        "foreground_intensity_properties_per_channel for it")
            normalization.append(ChannelNormalization("ct", clip_low=float(stats["percentile_00_5"]),
                                                      clip_high=float(stats["percentile_99_5"]),
                                                      mean=float(stats["mean"]), std=float(stats["std"])))
        elif scheme == "ZScoreNormalization" and not use_mask:
            normalization.append(ChannelNormalization("zscore"))
        else:
            raise NnUNetFormatError(f"{source}: channel {channel} normalisation {scheme} (use_mask_for_norm "
                                    f"{use_mask}) is not supported; expected CTNormalization or ZScoreNormalization "
                                    "without mask")
    spacing = tuple(float(s) for s in config["spacing"])
    return Plan(
        preset=str(plans.get("plans_name", "nnunet")), target_spacing=spacing,
        median_shape=tuple(round(float(m)) for m in config.get("median_image_size_in_voxels", config["patch_size"])),
        patch_size=tuple(int(p) for p in config["patch_size"]), batch_size=int(config.get("batch_size", 2)),
        normalization=normalization, kernel_sizes=arch["kernel_sizes"], strides=arch["strides"],
        features_per_stage=arch["features_per_stage"], n_blocks_per_stage=arch["n_blocks_per_stage"],
        n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"], num_input_channels=len(channels),
        num_classes=len(labels), num_subtypes=0, labels=labels,
        anisotropy_threshold=_anisotropy_threshold(config, source), network=network,
    )


def _intensity_properties(plan: Plan, fingerprint: Fingerprint | None) -> dict:
    """nnU-Net's foreground_intensity_properties_per_channel. Without a fingerprint only what
    CTNormalization reads (mean, std, 0.5 / 99.5 percentiles) is exact; median, min and max repeat them."""
    properties = {}
    for channel, norm in enumerate(plan.normalization):
        if fingerprint is not None and channel < len(fingerprint.intensity):
            stats = fingerprint.intensity[channel]
            values = {"max": stats.max, "mean": stats.mean, "median": stats.median, "min": stats.min,
                      "percentile_00_5": stats.percentile_00_5, "percentile_99_5": stats.percentile_99_5,
                      "std": stats.std}
        elif norm.scheme == "ct":
            values = {"max": norm.clip_high, "mean": norm.mean, "median": norm.mean, "min": norm.clip_low,
                      "percentile_00_5": norm.clip_low, "percentile_99_5": norm.clip_high, "std": norm.std}
        else:
            values = {"max": 0.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                      "percentile_99_5": 0.0, "std": 1.0}
        properties[str(channel)] = {k: float(v) for k, v in values.items()}
    return properties


def nnunet_plans(model: UNetBackbone, plan: Plan, dataset_name: str = "Dataset001_Pancreas",
                 plans_name: str | None = None, configuration: str = "3d_fullres",
                 fingerprint: Fingerprint | None = None) -> dict:
    """nnU-Net v2 plans.json for a network trained on ``plan`` (resampling: nnU-Net's defaults, with the
    plan's separate-axis threshold)."""
    for scheme in (n.scheme for n in plan.normalization):
        if scheme not in NORMALIZATION_NAMES:
            raise NnUNetFormatError(f"normalisation scheme {scheme!r} has no nnU-Net equivalent")
    if fingerprint is not None:
        original_spacing = [statistics.median(s[a] for s in fingerprint.spacings) for a in range(3)]
        original_shape = [statistics.median(s[a] for s in fingerprint.shapes_after_crop) for a in range(3)]
    else:  # only used by nnU-Net's planners, not by its predictor
        original_spacing, original_shape = list(plan.target_spacing), list(plan.median_shape)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    if plan.anisotropy_threshold != ANISOTROPY_THRESHOLD:  # unset: nnU-Net's default, as plans it writes
        resampling["separate_z_anisotropy_threshold"] = float(plan.anisotropy_threshold)
    # the names nnU-Net's own planners give the plans our presets reproduce
    preset = plan.preset if plan.preset in ("M", "L", "XL") else None
    default_planner = plan.preset == "plainconv"
    own_name = "nnUNetPlans" if default_planner else f"pancreas_mtl_{plan.preset}"
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name or (f"nnUNetResEncUNet{preset}Plans" if preset else own_name),
        "original_median_spacing_after_transp": [float(s) for s in original_spacing],
        "original_median_shape_after_transp": [round(float(s)) for s in original_shape],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": int(plan.batch_size),
            "patch_size": [int(p) for p in plan.patch_size],
            "median_image_size_in_voxels": [float(m) for m in plan.median_shape],
            "spacing": [float(s) for s in plan.target_spacing],
            "normalization_schemes": [NORMALIZATION_NAMES[n.scheme] for n in plan.normalization],
            "use_mask_for_norm": [False] * len(plan.normalization),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
            "architecture": architecture_from_model(model),
            "batch_dice": False,
        }},
        "experiment_planner_used": (f"nnUNetPlannerResEnc{preset}" if preset else
                                    "ExperimentPlanner" if default_planner else "pancreas_mtl.planning.planner"),
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": _intensity_properties(plan, fingerprint),
    }


def nnunet_dataset_json(plan: Plan, num_training: int = 0, file_ending: str = ".nii.gz") -> dict:
    """A minimal nnU-Net v2 dataset.json for a plan: channel names, labels, file ending."""
    names = {str(i): ("CT" if n.scheme == "ct" else f"channel_{i}") for i, n in enumerate(plan.normalization)}
    return {"channel_names": names, "labels": dict(plan.labels), "numTraining": int(num_training),
            "file_ending": file_ending}
