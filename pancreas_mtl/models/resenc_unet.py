"""The segmentation backbone: nnU-Net v2's residual encoder UNet (ResEnc), sized entirely by its arguments.

The topology, initialisation and parameter count are those of dynamic-network-architectures'
``ResidualEncoderUNet`` with BasicBlockD blocks (what nnU-Net's ResEnc M/L/XL presets build);
``pancreas_mtl.models.nnunet_io`` maps its weights to and from nnU-Net's key names. ``UNetBackbone``
(sizes, decoder, forward) is shared with nnU-Net's default network, ``models.plainconv_unet.PlainConvUNet``.
Tensors are (B, C, Z, Y, X); every spatial triple is in (z, y, x) order.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pancreas_mtl.planning.plan import Plan

Triple = tuple[int, int, int]


@dataclass
class UNetOutput:
    """What one forward pass of the backbone returns.

    Attributes:
        seg_logits: segmentation logits (B, num_classes, Z_i, Y_i, X_i), highest resolution first: one
            per decoder stage with deep supervision, else only the full-resolution one.
        decoder_features: output of every decoder stage (B, C_i, Z_i, Y_i, X_i), lowest resolution
            first (the order they are computed in; ``decoder_features[-1]`` is full resolution).
        bottleneck: output of the deepest encoder stage (B, C, Z, Y, X).
    """

    seg_logits: list[Tensor]
    decoder_features: list[Tensor]
    bottleneck: Tensor


class ConvNormAct(nn.Module):
    """Conv3d -> InstanceNorm3d -> LeakyReLU (the activation left out with ``activation=False``).

    nnU-Net's ConvDropoutNormReLU without dropout; padding keeps the size ("same") at stride 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int] | int = 1, bias: bool = True, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2, activation: bool = True):
        super().__init__()
        kernel_size = tuple(int(k) for k in kernel_size)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride,
                              padding=tuple((k - 1) // 2 for k in kernel_size), bias=bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=norm_eps, affine=True)
        self.act = nn.LeakyReLU(negative_slope, inplace=True) if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """ResNet-D basic block: two convs on the main path, average pool + 1x1 conv on the residual path.

    main: conv(k, stride) -> norm -> LeakyReLU -> conv(k) -> norm; residual: identity, or
    AvgPool(stride) where strided and 1x1 conv (no bias) -> norm where the channels change; the sum
    goes through LeakyReLU. A strided block whose channels stay the same (320 -> 320 deep in ResEnc M)
    has a pool but no projection, as in nnU-Net's BasicBlockD.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], bias: bool = True, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2):
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride, bias, norm_eps, negative_slope)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, 1, bias, norm_eps, negative_slope,
                                 activation=False)
        skip: OrderedDict[str, nn.Module] = OrderedDict()
        if any(s != 1 for s in stride):
            skip["pool"] = nn.AvgPool3d(stride, stride)
        if in_channels != out_channels:
            skip["proj"] = ConvNormAct(in_channels, out_channels, (1, 1, 1), 1, False, norm_eps, negative_slope,
                                       activation=False)
        self.skip = nn.Sequential(skip) if skip else nn.Identity()
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class DecoderStage(nn.Module):
    """Transposed conv (kernel = stride) up to the skip's resolution, concatenation, then convs."""

    def __init__(self, below_channels: int, skip_channels: int, stride: Sequence[int], kernel_size: Sequence[int],
                 n_convs: int, bias: bool = True, norm_eps: float = 1e-5, negative_slope: float = 1e-2):
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.upsample = nn.ConvTranspose3d(below_channels, skip_channels, stride, stride, bias=bias)
        self.convs = nn.Sequential(*[
            ConvNormAct(2 * skip_channels if i == 0 else skip_channels, skip_channels, kernel_size, 1, bias,
                        norm_eps, negative_slope)
            for i in range(n_convs)])

    def forward(self, below: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat((self.upsample(below), skip), dim=1))


def unet_arch(network_class: str, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
              kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
              n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int], conv_bias: bool,
              norm_eps: float, negative_slope: float) -> dict:
    """The checked sizes of a UNet backbone as the ``arch`` dict it keeps (everything needed to rebuild it:
    checkpoints, nnU-Net export); ValueError naming ``network_class`` and the argument that does not fit."""
    n_stages = len(features_per_stage)
    kernel_sizes = [tuple(int(k) for k in kernel) for kernel in kernel_sizes]
    strides = [tuple(int(s) for s in stride) for stride in strides]
    lengths = {"kernel_sizes": len(kernel_sizes), "strides": len(strides),
               "n_blocks_per_stage": len(n_blocks_per_stage)}
    if n_stages < 2 or any(n != n_stages for n in lengths.values()):
        raise ValueError(f"{network_class} needs at least 2 stages and one entry per stage in every per-stage "
                         f"argument: features_per_stage has {n_stages}, {lengths}")
    if len(n_conv_per_stage_decoder) != n_stages - 1:
        raise ValueError(f"n_conv_per_stage_decoder needs {n_stages - 1} entries (one per decoder stage), "
                         f"got {list(n_conv_per_stage_decoder)}")
    if any(len(k) != 3 or min(k) < 1 or k_i % 2 == 0 for k in kernel_sizes for k_i in k):
        raise ValueError(f"kernel_sizes must be odd (z, y, x) triples, got {kernel_sizes}")
    if any(len(s) != 3 or min(s) < 1 for s in strides):
        raise ValueError(f"strides must be positive (z, y, x) triples, got {strides}")
    if min(n_blocks_per_stage) < 1 or min(n_conv_per_stage_decoder) < 1:
        raise ValueError(f"every stage needs at least one block and one decoder conv, got "
                         f"{list(n_blocks_per_stage)} and {list(n_conv_per_stage_decoder)}")
    return {
        "in_channels": int(in_channels), "num_classes": int(num_classes),
        "features_per_stage": [int(f) for f in features_per_stage], "kernel_sizes": kernel_sizes,
        "strides": strides, "n_blocks_per_stage": [int(n) for n in n_blocks_per_stage],
        "n_conv_per_stage_decoder": [int(n) for n in n_conv_per_stage_decoder],
        "conv_bias": bool(conv_bias), "norm_eps": float(norm_eps), "negative_slope": float(negative_slope),
    }


class UNetBackbone(nn.Module):
    """What nnU-Net's UNets share (ResEncUNet, PlainConvUNet): the sizes, the decoder with one segmentation
    head per decoder stage, and the forward pass. A subclass builds its encoder and defines ``encode``.

    Decoder stage i (from the deepest) upsamples with a transposed conv, concatenates the encoder skip of
    the same resolution and applies ``n_conv_per_stage_decoder[i]`` convs; a 1x1 conv per decoder stage
    gives that stage's segmentation logits.
    """

    network = ""  # the plan's network kind (Plan.network), set by each subclass

    def _set_sizes(self, arch: dict, deep_supervision: bool) -> None:
        self.arch = arch
        self.deep_supervision = bool(deep_supervision)
        self.num_classes = arch["num_classes"]
        self.divisor: Triple = tuple(math.prod(s[axis] for s in arch["strides"]) for axis in range(3))
        features = arch["features_per_stage"]
        # decoder stage i produces the resolution of encoder stage n_stages - 2 - i
        self.decoder_channels: list[int] = [features[-(i + 2)] for i in range(len(features) - 1)]
        self.bottleneck_channels = features[-1]

    def _build_decoder(self) -> None:
        arch = self.arch
        features, strides, kernels = arch["features_per_stage"], arch["strides"], arch["kernel_sizes"]
        common = {"bias": arch["conv_bias"], "norm_eps": arch["norm_eps"], "negative_slope": arch["negative_slope"]}
        self.decoder = nn.ModuleList([
            DecoderStage(features[-(i + 1)], features[-(i + 2)], strides[-(i + 1)], kernels[-(i + 2)],
                         arch["n_conv_per_stage_decoder"][i], **common)
            for i in range(len(features) - 1)])
        # built for every decoder stage, so weights load whether or not deep supervision is on
        self.seg_heads = nn.ModuleList([nn.Conv3d(c, self.num_classes, 1, 1, 0, bias=True)
                                        for c in self.decoder_channels])

    @property
    def num_stages(self) -> int:
        return len(self.encoder)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The output of every encoder stage, full resolution first (the last is the bottleneck)."""
        raise NotImplementedError

    def forward(self, x: Tensor, deep_supervision: bool | None = None) -> UNetOutput:
        """x: (B, in_channels, Z, Y, X), each spatial dim a multiple of ``divisor``.

        ``deep_supervision`` overrides the module's setting for this call (None: use it).
        """
        if tuple(x.shape[2:][axis] % self.divisor[axis] for axis in range(3)) != (0, 0, 0):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} (z, y, x) is not divisible by the "
                             f"product of the strides {self.divisor}")
        supervise_all = self.deep_supervision if deep_supervision is None else deep_supervision
        skips = self.encode(x)
        x = skips[-1]
        decoder_features, seg_logits = [], []
        last = len(self.decoder) - 1
        for i, (stage, seg_head) in enumerate(zip(self.decoder, self.seg_heads)):
            x = stage(x, skips[-(i + 2)])
            decoder_features.append(x)
            if supervise_all or i == last:
                seg_logits.append(seg_head(x))
        return UNetOutput(seg_logits=seg_logits[::-1], decoder_features=decoder_features, bottleneck=skips[-1])


class ResEncUNet(UNetBackbone):
    """Residual encoder UNet of nnU-Net v2 (ResEnc M/L/XL), with deep supervision outputs.

    A stem conv maps the input to ``features_per_stage[0]`` channels; encoder stage s is
    ``n_blocks_per_stage[s]`` residual blocks, the first strided by ``strides[s]``; decoder stage i
    (from the deepest) upsamples with a transposed conv, concatenates the encoder skip of the same
    resolution and applies ``n_conv_per_stage_decoder[i]`` convs; a 1x1 conv per decoder stage gives
    that stage's segmentation logits. InstanceNorm3d (affine), LeakyReLU, no dropout; He
    initialisation with the last norm of every residual block zeroed, like nnU-Net's
    ``ResidualEncoderUNet.initialize``.

    Args:
        in_channels: input image channels.
        num_classes: segmentation classes, background included.
        features_per_stage: channels of each resolution stage, full resolution first.
        kernel_sizes: (z, y, x) conv kernel of each stage; odd sizes.
        strides: (z, y, x) stride of each stage's first block; stage 0 is usually (1, 1, 1). Input
            spatial dims must be divisible by the product of the strides per axis (``divisor``).
        n_blocks_per_stage: residual blocks per encoder stage.
        n_conv_per_stage_decoder: convs per decoder stage, deepest decoder stage first; one entry
            fewer than there are stages.
        deep_supervision: return the logits of every decoder stage (training) instead of only the
            full-resolution ones; can be changed later, or per call in ``forward``.
        conv_bias: bias in the main-path and decoder convs (nnU-Net: True); the residual 1x1
            projection never has one.
        norm_eps: InstanceNorm3d epsilon.
        negative_slope: LeakyReLU slope, also used by the He initialisation.
        zero_init_residual: zero the affine parameters of each block's last norm at initialisation,
            so every residual block starts as its skip path (nnU-Net does this).
    """

    network = "resenc"  # the plan's network kind (Plan.network) this backbone is built for

    def __init__(self, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                 deep_supervision: bool = True, conv_bias: bool = True, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2, zero_init_residual: bool = True):
        super().__init__()
        self._set_sizes(unet_arch("ResEncUNet", in_channels, num_classes, features_per_stage, kernel_sizes, strides,
                                  n_blocks_per_stage, n_conv_per_stage_decoder, conv_bias, norm_eps,
                                  negative_slope), deep_supervision)
        kernel_sizes, strides = self.arch["kernel_sizes"], self.arch["strides"]
        common = {"bias": conv_bias, "norm_eps": norm_eps, "negative_slope": negative_slope}

        self.stem = ConvNormAct(in_channels, features_per_stage[0], kernel_sizes[0], 1, **common)
        self.encoder = nn.ModuleList()
        channels = features_per_stage[0]
        for s in range(len(features_per_stage)):
            self.encoder.append(nn.Sequential(*[
                ResidualBlock(channels if b == 0 else features_per_stage[s], features_per_stage[s],
                              kernel_sizes[s], strides[s] if b == 0 else (1, 1, 1), **common)
                for b in range(n_blocks_per_stage[s])]))
            channels = features_per_stage[s]
        self._build_decoder()
        self.initialize(zero_init_residual)

    @classmethod
    def from_plan(cls, plan: Plan, deep_supervision: bool = True, **kwargs) -> ResEncUNet:
        """The network a plan describes; ``kwargs`` go to the constructor (conv_bias, norm_eps, ...)."""
        return cls(in_channels=plan.num_input_channels, num_classes=plan.num_classes,
                   features_per_stage=plan.features_per_stage, kernel_sizes=plan.kernel_sizes,
                   strides=plan.strides, n_blocks_per_stage=plan.n_blocks_per_stage,
                   n_conv_per_stage_decoder=plan.n_conv_per_stage_decoder,
                   deep_supervision=deep_supervision, **kwargs)

    @torch.no_grad()
    def initialize(self, zero_init_residual: bool = True) -> None:
        """nnU-Net's InitWeights_He(1e-2) on every (transposed) conv, biases 0, then optionally the
        last norm of each residual block set to 0 (init_last_bn_before_add_to_0)."""
        slope = self.arch["negative_slope"]
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=slope)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif zero_init_residual and isinstance(module, ResidualBlock):
                nn.init.zeros_(module.conv2.norm.weight)
                nn.init.zeros_(module.conv2.norm.bias)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The output of every encoder stage, full resolution first (the last is the bottleneck)."""
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return skips


def count_parameters(module: nn.Module) -> int:
    """Number of parameters, each shared tensor once."""
    return sum(p.numel() for p in module.parameters())
