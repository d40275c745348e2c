"""nnU-Net v2's default segmentation network, the plain-conv UNet (``PlainConvUNet``), sized by its arguments.

The topology, initialisation and parameter count are those of dynamic-network-architectures'
``PlainConvUNet`` as nnU-Net's default ``ExperimentPlanner`` configures it (3d_fullres: the architecture
of most public nnU-Net v2 models, TotalSegmentator's among them), so their weights load for a warm start
(``pancreas_mtl.models.nnunet_io``). Tensors are (B, C, Z, Y, X); every spatial triple is in (z, y, x) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pancreas_mtl.models.resenc_unet import ConvNormAct, UNetBackbone, unet_arch

if TYPE_CHECKING:
    from pancreas_mtl.planning.plan import Plan


class PlainConvUNet(UNetBackbone):
    """Plain-conv UNet of nnU-Net v2 (its default planner's network), with deep supervision outputs.

    Encoder stage s is ``n_blocks_per_stage[s]`` convs (nnU-Net's ``n_conv_per_stage``), the first strided
    by ``strides[s]`` (stage 0's first conv reads the input: there is no stem); decoder stage i (from the
    deepest) upsamples with a transposed conv, concatenates the encoder skip of the same resolution and
    applies ``n_conv_per_stage_decoder[i]`` convs; a 1x1 conv per decoder stage gives that stage's
    segmentation logits. Every conv is Conv3d -> InstanceNorm3d (affine) -> LeakyReLU, no dropout; He
    initialisation, like nnU-Net's ``PlainConvUNet.initialize``.

    Args:
        in_channels: input image channels.
        num_classes: segmentation classes, background included.
        features_per_stage: channels of each resolution stage, full resolution first.
        kernel_sizes: (z, y, x) conv kernel of each stage; odd sizes.
        strides: (z, y, x) stride of each stage's first conv; stage 0 is usually (1, 1, 1). Input
            spatial dims must be divisible by the product of the strides per axis (``divisor``).
        n_blocks_per_stage: convs per encoder stage (nnU-Net's default planner: 2).
        n_conv_per_stage_decoder: convs per decoder stage, deepest decoder stage first; one entry
            fewer than there are stages.
        deep_supervision: return the logits of every decoder stage (training) instead of only the
            full-resolution ones; can be changed later, or per call in ``forward``.
        conv_bias: bias in every encoder and decoder conv (nnU-Net's planner: True).
        norm_eps: InstanceNorm3d epsilon.
        negative_slope: LeakyReLU slope, also used by the He initialisation.
    """

    network = "plainconv"  # the plan's network kind (Plan.network) this backbone is built for

    def __init__(self, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                 deep_supervision: bool, conv_bias: bool, norm_eps: float, negative_slope: float):
        super().__init__()
        self._set_sizes(unet_arch("PlainConvUNet", in_channels, num_classes, features_per_stage, kernel_sizes,
                                  strides, n_blocks_per_stage, n_conv_per_stage_decoder, conv_bias, norm_eps,
                                  negative_slope), deep_supervision)
        arch = self.arch
        common = {"bias": arch["conv_bias"], "norm_eps": arch["norm_eps"], "negative_slope": arch["negative_slope"]}
        self.encoder = nn.ModuleList()
        channels = arch["in_channels"]
        for s, features in enumerate(arch["features_per_stage"]):
            self.encoder.append(nn.Sequential(*[
                ConvNormAct(channels if c == 0 else features, features, arch["kernel_sizes"][s],
                            arch["strides"][s] if c == 0 else 1, **common)
                for c in range(arch["n_blocks_per_stage"][s])]))
            channels = features
        self._build_decoder()
        self.initialize()

    @classmethod
    def from_plan(cls, plan: Plan, deep_supervision: bool, conv_bias: bool, norm_eps: float,
                  negative_slope: float) -> PlainConvUNet:
        """The network a plan describes; the knobs come from ``conf/model/backbone/plainconv.yaml``."""
        return cls(in_channels=plan.num_input_channels, num_classes=plan.num_classes,
                   features_per_stage=plan.features_per_stage, kernel_sizes=plan.kernel_sizes,
                   strides=plan.strides, n_blocks_per_stage=plan.n_blocks_per_stage,
                   n_conv_per_stage_decoder=plan.n_conv_per_stage_decoder, deep_supervision=deep_supervision,
                   conv_bias=conv_bias, norm_eps=norm_eps, negative_slope=negative_slope)

    @torch.no_grad()
    def initialize(self) -> None:
        """nnU-Net's InitWeights_He(1e-2) on every (transposed) conv, biases 0; norms keep weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=self.arch["negative_slope"])
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The output of every encoder stage, full resolution first (the last is the bottleneck)."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return skips
