"""Network topology of nnU-Net's UNets from spacing and patch size, and their memory estimates.

These are nnU-Net v2's rules (``get_pool_and_conv_props`` in
``nnunetv2/experiment_planning/experiment_planners/network_topology.py`` and
``compute_conv_feature_map_size`` of dynamic-network-architectures' ``ResidualEncoderUNet`` and
``PlainConvUNet``), written as pure functions. Every spatial triple is in tensor axis order (z, y, x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Topology:
    """Per-stage convolution kernels and strides, and the patch size they fit.

    Attributes:
        patch_size: (z, y, x), divisible by ``divisor`` on every axis.
        kernel_sizes: one (z, y, x) kernel per stage; the deepest (bottleneck) is always 3 x 3 x 3.
        strides: one (z, y, x) stride per stage; stage 0 has stride 1 (full resolution).
        pools_per_axis: how often each axis is downsampled by 2.
    """

    patch_size: Triple
    kernel_sizes: list[Triple]
    strides: list[Triple]
    pools_per_axis: Triple

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> Triple:
        """What the patch (and any network input) must be divisible by, per axis."""
        return shape_divisor(self.strides)


def shape_divisor(strides: Sequence[Sequence[int]]) -> Triple:
    """Product of the strides per axis: an input must be a multiple of it on every axis."""
    return tuple(math.prod(stride[axis] for stride in strides) for axis in range(len(strides[0])))


def pad_to_multiple(shape: Sequence[float], divisor: Sequence[int]) -> Triple:
    """Round every axis of ``shape`` up to a multiple of ``divisor`` (unchanged when already one)."""
    return tuple(int(math.ceil(size / d - 1e-9)) * int(d) for size, d in zip(shape, divisor))


def conv_and_pool_topology(spacing: Sequence[float], patch_size: Sequence[float],
                           featuremap_min_edge_length: int = 4, max_stages: int | None = None) -> Topology:
    """Kernels and strides of every stage, as nnU-Net derives them, and the patch padded to fit them.

    Stage by stage, at the spacing the feature maps have at that stage:

    - an axis is downsampled (stride 2) when its feature map is at least twice
      ``featuremap_min_edge_length`` and its spacing is within a factor 2 of the finest such axis;
      a lone axis is downsampled only if it is at least three times that length; no axis left ends
      the encoder;
    - an axis gets kernel 3 once its spacing is within a factor 2 of the finest, else 1 (so a
      coarse z axis sees 1 x 3 x 3 kernels until in-plane downsampling has caught up);
    - the deepest stage (bottleneck) always has a 3 x 3 x 3 kernel.

    Args:
        spacing: (z, y, x) voxel spacing in mm of the input.
        patch_size: (z, y, x) patch; may be fractional (a median shape), the result is padded up to
            a multiple of 2^pools on every axis.
        featuremap_min_edge_length: smallest feature map edge in the bottleneck (nnU-Net: 4).
        max_stages: cap on the number of resolution stages, or None for nnU-Net's unbounded rule.
    """
    if len(spacing) != len(patch_size):
        raise ValueError(f"spacing {tuple(spacing)} and patch size {tuple(patch_size)} differ in length")
    if any(s <= 0 for s in spacing) or any(p <= 0 for p in patch_size):
        raise ValueError(f"spacing {tuple(spacing)} and patch size {tuple(patch_size)} must be positive")
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: list[Triple] = [(1,) * dim]
    kernels: list[Triple] = []
    min_edge = featuremap_min_edge_length

    while max_stages is None or len(strides) < max_stages:
        candidates = [a for a in range(dim) if current_size[a] >= 2 * min_edge]
        if not candidates:
            break
        finest_candidate = min(current_spacing[a] for a in candidates)
        axes = [a for a in candidates if current_spacing[a] / finest_candidate < 2]
        if len(axes) == 1 and current_size[axes[0]] < 3 * min_edge:
            break
        # once an axis is fine enough for a 3-kernel it keeps it at every deeper stage
        finest = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[a] / finest < 2 else 1 for a, k in enumerate(kernel)]
        stride = [1] * dim
        for a in axes:
            stride[a] = 2
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        kernels.append(tuple(kernel))
        strides.append(tuple(stride))

    kernels.append((3,) * dim)
    divisor = shape_divisor(strides)
    return Topology(patch_size=pad_to_multiple(patch_size, divisor), kernel_sizes=kernels, strides=strides,
                    pools_per_axis=tuple(pools))


def features_per_stage(num_stages: int, base_features: int, max_features: int) -> list[int]:
    """Channels per stage: doubling from ``base_features``, capped at ``max_features``."""
    return [min(max_features, base_features * 2 ** stage) for stage in range(num_stages)]


def per_stage(values: int | Sequence[int], num_stages: int) -> list[int]:
    """Expand a per-stage setting to ``num_stages`` entries; a list shorter than that repeats its last."""
    if isinstance(values, int):
        return [values] * num_stages
    values = [int(v) for v in values]
    if not values:
        raise ValueError("a per-stage setting needs at least one value")
    return (values + [values[-1]] * num_stages)[:num_stages]


def stage_shapes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[Triple]:
    """Feature map shape (z, y, x) of every encoder stage for an input of ``patch_size``."""
    shapes, shape = [], tuple(int(p) for p in patch_size)
    for stride in strides:
        shape = tuple(s // st for s, st in zip(shape, stride))
        shapes.append(shape)
    return shapes


def feature_map_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                       features: Sequence[int], blocks_per_stage: Sequence[int],
                       conv_per_stage_decoder: Sequence[int], num_classes: int,
                       deep_supervision: bool = False) -> int:
    """Sum of the output sizes (channels x voxels) of every conv of a residual encoder UNet for one patch.

    This is nnU-Net's proxy for training memory (``compute_conv_feature_map_size`` of
    dynamic-network-architectures' ``ResidualEncoderUNet`` with BasicBlockD blocks, strided convs and
    a one-conv stem); its presets compare it with a reference value per GPU memory target.

    Args:
        patch_size: (z, y, x) input.
        strides: per stage (z, y, x) stride, stage 0 first.
        features: channels per stage.
        blocks_per_stage: residual blocks (two convs each) per encoder stage.
        conv_per_stage_decoder: convs per decoder stage in the order they run, deepest first (as in
            nnU-Net); ``num_stages - 1`` entries.
        num_classes: segmentation outputs (counted at full resolution, and at every decoder stage
            with ``deep_supervision``; nnU-Net plans without it).
    """
    voxels = _stage_voxels(patch_size, strides, features, blocks_per_stage, conv_per_stage_decoder)
    num_stages = len(strides)
    total = features[0] * math.prod(int(p) for p in patch_size)  # stem conv
    in_channels = features[0]
    for stage in range(num_stages):
        out = features[stage] * voxels[stage]
        # each block's two convs; the first block also has a projection on its residual path when
        # it changes the channels or the resolution
        total += 2 * out * blocks_per_stage[stage]
        if in_channels != features[stage] or any(s != 1 for s in strides[stage]):
            total += out
        in_channels = features[stage]
    return int(total + _decoder_voxels(voxels, features, conv_per_stage_decoder, num_classes, deep_supervision))


def plainconv_feature_map_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                                 features: Sequence[int], conv_per_stage: Sequence[int],
                                 conv_per_stage_decoder: Sequence[int], num_classes: int,
                                 deep_supervision: bool = False) -> int:
    """Sum of the output sizes (channels x voxels) of every conv of a plain-conv UNet for one patch.

    ``compute_conv_feature_map_size`` of dynamic-network-architectures' ``PlainConvUNet`` (strided
    convs, no stem), the memory proxy of nnU-Net's default ExperimentPlanner. Arguments as in
    :func:`feature_map_voxels`, with ``conv_per_stage`` (nnU-Net's ``n_conv_per_stage``) convs per encoder
    stage, the first of them strided.
    """
    voxels = _stage_voxels(patch_size, strides, features, conv_per_stage, conv_per_stage_decoder)
    total = sum(features[stage] * voxels[stage] * conv_per_stage[stage] for stage in range(len(strides)))
    return int(total + _decoder_voxels(voxels, features, conv_per_stage_decoder, num_classes, deep_supervision))


def _stage_voxels(patch_size, strides, features, per_stage_encoder, conv_per_stage_decoder) -> list[int]:
    """Voxels of every encoder stage's feature map, after checking the per-stage lengths."""
    num_stages = len(strides)
    lengths = (len(features), len(per_stage_encoder), len(conv_per_stage_decoder))
    if lengths != (num_stages, num_stages, num_stages - 1):
        raise ValueError(f"{num_stages} stages need as many features and blocks and {num_stages - 1} decoder "
                         f"entries; got {lengths}")
    return [math.prod(shape) for shape in stage_shapes(patch_size, strides)]


def _decoder_voxels(voxels, features, conv_per_stage_decoder, num_classes: int, deep_supervision: bool) -> int:
    """The decoder's share (the same UNetDecoder in both networks): per decoder stage its convs after the skip
    concatenation, the transposed conv from the stage below and the segmentation output."""
    num_stages, total = len(voxels), 0
    for stage in range(num_stages - 1):
        out = features[stage] * voxels[stage]
        total += out * conv_per_stage_decoder[num_stages - 2 - stage]
        total += out
        if deep_supervision or stage == 0:
            total += num_classes * voxels[stage]
    return total
