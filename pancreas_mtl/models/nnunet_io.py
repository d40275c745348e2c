"""Import and export nnU-Net v2 model folders (plans.json, dataset.json, fold_k/checkpoint_final.pth).

Checkpoints are those of nnunetv2 >= 2.4 (``{network_weights, init_args, trainer_name,
inference_allowed_mirroring_axes, ...}``) for dynamic-network-architectures' ``ResidualEncoderUNet`` and
``PlainConvUNet`` (our ResEncUNet and PlainConvUNet);
the plans are translated by :mod:`pancreas_mtl.models.nnunet_plans`, the weights' key names by
:mod:`pancreas_mtl.models.nnunet_weights`. Checkpoints are read with ``torch.load(weights_only=True)``;
the numpy scalars in nnU-Net's training log are allowed explicitly (``NUMPY_SAFE_GLOBALS``), nothing
else is.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pancreas_mtl.files import load_json, save_json
from pancreas_mtl.models.nnunet_plans import (
    BACKBONES,
    nnunet_dataset_json,
    nnunet_plans,
    plan_from_nnunet,
    resolve_configuration,
    unet_kwargs_from_architecture,
)
from pancreas_mtl.models.nnunet_weights import NnUNetFormatError, load_nnunet_state_dict, to_nnunet_state_dict
from pancreas_mtl.models.resenc_unet import UNetBackbone
from pancreas_mtl.planning.plan import Fingerprint, Plan


def _numpy_safe_globals() -> list:
    """What nnU-Net checkpoints need beyond tensors: numpy scalars and dtypes (its training log holds
    np.float64 values), under both numpy 2's and numpy 1's module names, and plain numpy arrays."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    scalar, reconstruct = core.multiarray.scalar, core.multiarray._reconstruct
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqBHILQefdgFD"} - {np.dtype}
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            *sorted(dtype_classes, key=lambda c: c.__name__)]


NUMPY_SAFE_GLOBALS = _numpy_safe_globals()


def load_nnunet_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of an nnU-Net checkpoint, with only numpy's scalar types allowed.

    Raises:
        NnUNetFormatError: naming the objects the file holds that are not allowed; the file is never
            loaded with weights_only=False.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no nnU-Net checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the listing is only for the message
            needed = ["(could not be listed)"]
        raise NnUNetFormatError(
            f"{path}: cannot be read with torch.load(weights_only=True); it holds objects outside the allowed "
            f"tensors and numpy scalars: {needed}. pancreas_mtl does not load checkpoints unsafely; if you trust "
            f"the file, re-save only its 'network_weights' and plain values. ({str(error).splitlines()[-1]})"
        ) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise NnUNetFormatError(f"{path}: not an nnU-Net checkpoint (expected a dict with 'network_weights')")
    return checkpoint


@dataclass
class NnUNetModelInfo:
    """What an nnU-Net model folder says besides the weights.

    Attributes:
        folder, checkpoint: where it was read from.
        fold: the fold (int or "all").
        configuration: the plans configuration the network was trained with ("3d_fullres").
        trainer_name: nnU-Net trainer class that trained it.
        inference_allowed_mirroring_axes: axes test-time mirroring may flip, None if not stored.
        plans, dataset_json: the folder's JSON files as dicts.
        plan: the same as our Plan (num_subtypes 0).
    """

    folder: Path
    checkpoint: Path
    fold: int | str
    configuration: str
    trainer_name: str
    inference_allowed_mirroring_axes: tuple[int, ...] | None
    plans: dict
    dataset_json: dict
    plan: Plan


def load_nnunet_model_folder(folder: str | Path, fold: int | str = 0, checkpoint_name: str = "checkpoint_final.pth",
                             configuration: str | None = None,
                             deep_supervision: bool = False) -> tuple[UNetBackbone, NnUNetModelInfo]:
    """Our twin of an nnU-Net v2 training output folder's network, with its weights: a ResEncUNet for a
    ResidualEncoderUNet, a PlainConvUNet for a PlainConvUNet (``plan.network`` says which).

    Args:
        folder: holds plans.json, dataset.json and fold_{fold}/{checkpoint_name}.
        fold: which fold's checkpoint (int or "all").
        checkpoint_name: checkpoint_final.pth or checkpoint_best.pth.
        configuration: plans configuration; None takes the checkpoint's (init_args['configuration']).
        deep_supervision: the returned network's setting (nnU-Net predicts without).
    """
    folder = Path(folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an nnU-Net model folder: {name} is missing")
    plans, dataset_json = load_json(folder / "plans.json"), load_json(folder / "dataset.json")
    checkpoint_path = folder / f"fold_{fold}" / checkpoint_name
    checkpoint = load_nnunet_checkpoint(checkpoint_path)
    init_args = checkpoint.get("init_args") or {}
    configuration = configuration or init_args.get("configuration") or "3d_fullres"
    plan = plan_from_nnunet(plans, dataset_json, configuration, source=str(folder / "plans.json"))
    config = resolve_configuration(plans, configuration, str(folder / "plans.json"))
    network, kwargs = unet_kwargs_from_architecture(config["architecture"], plan.num_input_channels,
                                                    plan.num_classes, source=str(folder / "plans.json"))
    model = BACKBONES[network](**kwargs, deep_supervision=deep_supervision)
    load_nnunet_state_dict(model, checkpoint["network_weights"], source=str(checkpoint_path))
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    info = NnUNetModelInfo(folder=folder, checkpoint=checkpoint_path, fold=fold, configuration=configuration,
                           trainer_name=str(checkpoint.get("trainer_name", "nnUNetTrainer")),
                           inference_allowed_mirroring_axes=None if axes is None else tuple(int(a) for a in axes),
                           plans=plans, dataset_json=dataset_json, plan=plan)
    return model, info


def export_nnunet_model_folder(model: nn.Module, plan: Plan, folder: str | Path, dataset_json: Mapping | None = None,
                               fold: int | str = 0, *, fingerprint: Fingerprint | None = None,
                               dataset_name: str = "Dataset001_Pancreas", plans_name: str | None = None,
                               configuration: str = "3d_fullres", checkpoint_name: str = "checkpoint_final.pth",
                               trainer_name: str = "nnUNetTrainer",
                               inference_allowed_mirroring_axes: Sequence[int] = (0, 1, 2)) -> Path:
    """Write ``folder`` as an nnU-Net v2 training output that nnUNetPredictor can load.

    Writes plans.json, dataset.json and fold_{fold}/{checkpoint_name} holding the backbone's weights
    under nnU-Net's key names, ``init_args`` (plans, configuration, fold, dataset_json),
    ``trainer_name`` and ``inference_allowed_mirroring_axes``. Only the segmentation network is
    exported (a MultiTaskNet's classification head has no place in nnU-Net); there is no optimizer
    state, so nnU-Net can predict with the folder but not resume training from it.

    Args:
        model: a ResEncUNet or PlainConvUNet, or a network with one as ``.backbone``.
        plan: the plan it was trained with; must describe the same network.
        folder: output folder (created).
        dataset_json: nnU-Net dataset.json content; None writes a minimal one from the plan.
        fold: fold name of the checkpoint folder.
        fingerprint: the dataset fingerprint, for exact intensity properties and original medians.
    """
    backbone = getattr(model, "backbone", model)
    if type(backbone) not in BACKBONES.values():
        raise TypeError(f"expected a ResEncUNet or PlainConvUNet (or a network with one as .backbone), got "
                        f"{type(model).__name__}")
    if backbone.network != plan.network:
        raise ValueError(f"the network does not match the plan: network {backbone.network} "
                         f"({type(backbone).__name__}), plan {plan.network}")
    expected = {"in_channels": plan.num_input_channels, "num_classes": plan.num_classes,
                "features_per_stage": list(plan.features_per_stage),
                "kernel_sizes": [tuple(k) for k in plan.kernel_sizes], "strides": [tuple(s) for s in plan.strides],
                "n_blocks_per_stage": list(plan.n_blocks_per_stage),
                "n_conv_per_stage_decoder": list(plan.n_conv_per_stage_decoder)}
    differences = [f"{k}: network {backbone.arch[k]}, plan {v}" for k, v in expected.items() if backbone.arch[k] != v]
    if differences:
        raise ValueError("the network does not match the plan: " + "; ".join(differences))

    folder = Path(folder)
    plans = nnunet_plans(backbone, plan, dataset_name, plans_name, configuration, fingerprint)
    dataset_json = dict(dataset_json) if dataset_json is not None else nnunet_dataset_json(
        plan, num_training=len(fingerprint.case_ids) if fingerprint is not None else 0)
    save_json(plans, folder / "plans.json")
    save_json(dataset_json, folder / "dataset.json")
    checkpoint = {
        "network_weights": to_nnunet_state_dict(backbone),
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in inference_allowed_mirroring_axes),
    }
    path = folder / f"fold_{fold}" / checkpoint_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return folder
