"""nnU-Net v2 weight names: our ResEncUNet's and PlainConvUNet's parameters mapped one to one onto the state
dicts of dynamic-network-architectures' ``ResidualEncoderUNet`` and ``PlainConvUNet``, both ways."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

from torch import Tensor

from pancreas_mtl.models.plainconv_unet import PlainConvUNet
from pancreas_mtl.models.resenc_unet import ResEncUNet, UNetBackbone

# dynamic-network-architectures' class of each of our backbones, by Plan.network
NNUNET_CLASS_NAMES = {"resenc": "ResidualEncoderUNet", "plainconv": "PlainConvUNet"}


class NnUNetFormatError(ValueError):
    """An nnU-Net model folder, plans file or checkpoint that pancreas_mtl cannot use, and why."""


def _conv_norm_aliases(rest: str, theirs: str) -> list[str]:
    """nnU-Net's ConvDropoutNormReLU registers its conv and norm twice: as .conv/.norm and in .all_modules."""
    part, _, param = rest.partition(".")
    index = {"conv": 0, "norm": 1}[part]
    return [f"{theirs}.{part}.{param}", f"{theirs}.all_modules.{index}.{param}"]


def nnunet_key_aliases(model: UNetBackbone) -> OrderedDict[str, list[str]]:
    """For every state-dict key of ``model``, the keys nnU-Net's twin (ResidualEncoderUNet for a ResEncUNet,
    PlainConvUNet for a PlainConvUNet) stores it under.

    The first alias is the canonical one; nnU-Net's state dict also holds every encoder tensor a
    second time under ``decoder.encoder.`` (its decoder keeps a reference to the encoder).
    """
    if not isinstance(model, (ResEncUNet, PlainConvUNet)):
        raise TypeError(f"no nnU-Net names are known for a {type(model).__name__}; expected a ResEncUNet or a "
                        "PlainConvUNet")
    aliases: OrderedDict[str, list[str]] = OrderedDict()
    for key in model.state_dict():
        if m := re.fullmatch(r"decoder\.(\d+)\.upsample\.(.+)", key):
            aliases[key] = [f"decoder.transpconvs.{m[1]}.{m[2]}"]
        elif m := re.fullmatch(r"decoder\.(\d+)\.convs\.(\d+)\.(.+)", key):
            aliases[key] = _conv_norm_aliases(m[3], f"decoder.stages.{m[1]}.convs.{m[2]}")
        elif m := re.fullmatch(r"seg_heads\.(\d+)\.(.+)", key):
            aliases[key] = [f"decoder.seg_layers.{m[1]}.{m[2]}"]
        else:
            encoder = (_plainconv_encoder_aliases(key) if isinstance(model, PlainConvUNet)
                       else _resenc_encoder_aliases(model, key))
            if encoder is None:
                raise KeyError(f"no nnU-Net name known for parameter {key!r} of {type(model).__name__}")
            aliases[key] = encoder + [f"decoder.{name}" for name in encoder]
    return aliases


def _resenc_encoder_aliases(model: ResEncUNet, key: str) -> list[str] | None:
    """nnU-Net's names of a ResEncUNet encoder key (stem, residual blocks), or None for another key."""
    if m := re.fullmatch(r"stem\.((?:conv|norm)\..+)", key):
        return _conv_norm_aliases(m[1], "encoder.stem.convs.0")
    if m := re.fullmatch(r"encoder\.(\d+)\.(\d+)\.(conv[12])\.(.+)", key):
        return _conv_norm_aliases(m[4], f"encoder.stages.{m[1]}.blocks.{m[2]}.{m[3]}")
    if m := re.fullmatch(r"encoder\.(\d+)\.(\d+)\.skip\.proj\.(.+)", key):
        block = model.encoder[int(m[1])][int(m[2])]
        index = 1 if "pool" in block.skip._modules else 0  # nnU-Net: Sequential(AvgPool?, projection)
        return _conv_norm_aliases(m[3], f"encoder.stages.{m[1]}.blocks.{m[2]}.skip.{index}")
    return None


def _plainconv_encoder_aliases(key: str) -> list[str] | None:
    """nnU-Net's names of a PlainConvUNet encoder key, or None for another key: their PlainConvEncoder's
    stage s is Sequential(StackedConvBlocks) (no pooling module with strided convs), its convs in .convs."""
    if m := re.fullmatch(r"encoder\.(\d+)\.(\d+)\.((?:conv|norm)\..+)", key):
        return _conv_norm_aliases(m[3], f"encoder.stages.{m[1]}.0.convs.{m[2]}")
    return None


def to_nnunet_state_dict(model: UNetBackbone) -> OrderedDict[str, Tensor]:
    """The backbone's weights under every key its nnU-Net twin's load_state_dict expects."""
    weights: OrderedDict[str, Tensor] = OrderedDict()
    state = model.state_dict()
    for key, names in nnunet_key_aliases(model).items():
        tensor = state[key].detach().to("cpu", copy=True).contiguous()
        for name in names:
            weights[name] = tensor  # one tensor under every alias, stored once by torch.save
    return weights


def _strip_wrappers(key: str) -> str:
    """Keys saved from a DDP or torch.compile'd network carry 'module.' / '_orig_mod.' prefixes."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def load_nnunet_state_dict(model: UNetBackbone, weights: Mapping[str, Tensor], source: str = "state dict") -> None:
    """Copy the weights of ``model``'s nnU-Net twin (ResidualEncoderUNet, PlainConvUNet) into it; every tensor
    must be there, with its shape.

    Raises:
        NnUNetFormatError: naming the missing, unexpected and mismatched keys of ``source``.
    """
    weights = {_strip_wrappers(k): v for k, v in weights.items()}
    own = model.state_dict()
    state, missing, mismatched, used = {}, [], [], set()
    for key, names in nnunet_key_aliases(model).items():
        found = next((n for n in names if n in weights), None)
        if found is None:
            missing.append(names[0])
            continue
        used.update(names)
        if tuple(weights[found].shape) != tuple(own[key].shape):
            mismatched.append(f"{found}: expected {tuple(own[key].shape)}, found {tuple(weights[found].shape)}")
            continue
        state[key] = weights[found]
    unexpected = sorted(set(weights) - used)
    if missing or mismatched or unexpected:
        def listed(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
        problems = [f"{len(found)} {what}: {listed(found)}" for what, found in
                    (("missing", missing), ("with another shape", mismatched), ("unexpected", unexpected)) if found]
        network = NNUNET_CLASS_NAMES[model.network]
        raise NnUNetFormatError(f"{source}: the weights do not fit the {network} the plans describe; "
                                + "; ".join(problems))
    model.load_state_dict(state)
