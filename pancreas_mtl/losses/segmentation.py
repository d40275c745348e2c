"""Segmentation loss: nnU-Net v2's soft Dice + cross-entropy, summed over deep-supervision outputs.

Conventions, as in nnU-Net v2 (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``):

- The Dice term is the *negative* mean soft Dice, so it lies in [-1, 0] and a perfect prediction
  gives -1; Dice + CE therefore goes below zero during training (nnU-Net logs the same numbers).
- Soft Dice runs on softmax probabilities, without the background channel, with smooth 1e-5 added to
  numerator and denominator. ``batch_dice=False`` (nnU-Net's 3d_fullres value whenever the plan has no
  3d_lowres stage, as for this data) computes one Dice per sample and class and averages them;
  ``batch_dice=True`` pools the voxels of the whole (local) batch per class first.
- Deep supervision: output ``i`` (0 = full resolution) weighs 1/2^i, the lowest resolution weighs 0,
  and the weights are normalised to sum to 1. The full-resolution label is brought to each output's
  shape by nearest-neighbour selection (``nearest-exact``, as nnU-Net's ``DownsampleSegForDSTransform``).

Axis order is (Z, Y, X) throughout; the loss itself does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights for ``num_outputs`` outputs, highest resolution first.

    1/2^i for output i, the lowest-resolution output set to 0, normalised to sum to 1. A single output
    (deep supervision off) weighs 1.
    """
    if num_outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {num_outputs}")
    if num_outputs == 1:
        return [1.0]
    weights = [1.0 / 2**i for i in range(num_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_label(label: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """The full-resolution label brought to every deep-supervision output's spatial shape.

    Nearest-neighbour selection (``nearest-exact``, nnU-Net v2's choice), so every voxel keeps a label
    value that exists in the input; no one-hot or averaging.

    Args:
        label: (B, 1, Z, Y, X) integer labels at full patch resolution.
        shapes: one (z, y, x) per output, e.g. ``[o.shape[2:] for o in seg_logits]``.

    Returns:
        One (B, 1, z, y, x) tensor per shape, same dtype as ``label``; a shape equal to the label's own
        returns ``label`` itself.
    """
    if label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, Z, Y, X), got shape {tuple(label.shape)}")
    full_shape = tuple(label.shape[2:])
    targets = []
    as_float = None
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if shape == full_shape:
            targets.append(label)
            continue
        if as_float is None:
            # interpolate is not defined for integer dtypes; labels 0..255 are exact in float32
            as_float = label.float()
        targets.append(F.interpolate(as_float, size=shape, mode="nearest-exact").to(label.dtype))
    return targets


def soft_dice_loss(logits: Tensor, target: Tensor, *, batch_dice: bool = False,
                   include_background: bool = False, smooth: float = 1e-5) -> Tensor:
    """Negative mean soft Dice of softmax(logits) against integer labels (-1 is perfect).

    Args:
        logits: (B, C, Z, Y, X) raw network outputs.
        target: (B, 1, Z, Y, X) integer labels in [0, C).
        batch_dice: pool intersection and sums over the batch before the ratio (one Dice per class)
            instead of one Dice per sample and class.
        include_background: keep channel 0 in the average (nnU-Net: no).
        smooth: added to numerator and denominator; keeps empty-vs-empty near 1 and avoids 0/0.
    """
    # float32 sums: a 64 x 128 x 192 patch has 1.6 M voxels, past what float16 can hold
    probabilities = torch.softmax(logits.float(), dim=1)
    with torch.no_grad():
        one_hot = torch.zeros_like(probabilities, dtype=torch.bool).scatter_(1, target.long(), True)
    if not include_background:
        probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]
    axes = tuple(range(2, probabilities.ndim))
    intersection = (probabilities * one_hot).sum(axes)  # (B, C')
    predicted = probabilities.sum(axes)
    reference = one_hot.sum(axes).to(probabilities.dtype)
    if batch_dice:
        intersection, predicted, reference = intersection.sum(0), predicted.sum(0), reference.sum(0)
    dice = (2 * intersection + smooth) / (predicted + reference + smooth).clamp_min(1e-8)
    return -dice.mean()


class SegmentationLoss(nn.Module):
    """nnU-Net's Dice + cross-entropy over the deep-supervision outputs of the decoder.

    Args:
        weight_dice: weight of the Dice term (nnU-Net: 1).
        weight_ce: weight of the cross-entropy term (nnU-Net: 1).
        batch_dice: Dice over the whole batch per class rather than per sample (nnU-Net 3d_fullres without
            a 3d_lowres stage, as for this data: False). Pools the local batch only (no DDP gather).
        include_background: Dice over the background channel too (nnU-Net: False).
        smooth: Dice smoothing term (nnU-Net: 1e-5).
        deep_supervision: use every output; False uses only the first (full-resolution) one.
        deep_supervision_weights: one weight per output, highest resolution first, normalised to sum 1;
            ``None`` gives nnU-Net's 1/2^i with the lowest resolution at 0 for however many outputs come.

    The values are conf/loss/default.yaml's ``seg_loss`` (nnU-Net's, noted above); none has a default here.

    ``forward(seg_logits, label)`` takes ``seg_logits``: a list of (B, C, z, y, x), highest resolution
    first (or one tensor), and ``label``: (B, 1, Z, Y, X) integer labels at the first output's
    resolution (or a list of per-output labels already downsampled). It returns a dict of scalar
    tensors: ``seg`` (the weighted total), ``dice`` and ``ce`` (the deep-supervision-weighted terms
    before ``weight_dice`` / ``weight_ce``). Outputs with weight 0 are still computed (cheap at the
    lowest resolution) so every parameter takes part in the graph, which DDP requires.
    """

    def __init__(self, weight_dice: float, weight_ce: float, batch_dice: bool, include_background: bool,
                 smooth: float, deep_supervision: bool, deep_supervision_weights: Sequence[float] | None):
        super().__init__()
        if deep_supervision_weights is not None:
            weights = [float(w) for w in deep_supervision_weights]
            if not weights or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"deep_supervision_weights must be non-negative with a positive sum, "
                                 f"got {weights}")
            deep_supervision_weights = [w / sum(weights) for w in weights]
        self.weight_dice = float(weight_dice)
        self.weight_ce = float(weight_ce)
        self.batch_dice = bool(batch_dice)
        self.include_background = bool(include_background)
        self.smooth = float(smooth)
        self.deep_supervision = bool(deep_supervision)
        self.deep_supervision_weights = deep_supervision_weights

    def output_weights(self, num_outputs: int) -> list[float]:
        """The weight of each of ``num_outputs`` outputs (after ``deep_supervision`` picks them)."""
        if self.deep_supervision_weights is None:
            return deep_supervision_weights(num_outputs)
        if len(self.deep_supervision_weights) != num_outputs:
            raise ValueError(f"deep_supervision_weights has {len(self.deep_supervision_weights)} entries but the "
                             f"network returned {num_outputs} segmentation outputs")
        return list(self.deep_supervision_weights)

    def forward(self, seg_logits: Tensor | Sequence[Tensor],
                label: Tensor | Sequence[Tensor]) -> dict[str, Tensor]:
        outputs = [seg_logits] if isinstance(seg_logits, Tensor) else list(seg_logits)
        if not self.deep_supervision:
            outputs = outputs[:1]
        if isinstance(label, Tensor):
            targets = downsample_label(label, [output.shape[2:] for output in outputs])
        else:
            targets = list(label)[: len(outputs)]
            if len(targets) != len(outputs):
                raise ValueError(f"got {len(targets)} targets for {len(outputs)} segmentation outputs")
        dice_total = ce_total = None
        for weight, logits, target in zip(self.output_weights(len(outputs)), outputs, targets):
            if tuple(target.shape[2:]) != tuple(logits.shape[2:]):
                raise ValueError(f"target shape {tuple(target.shape)} does not match output shape "
                                 f"{tuple(logits.shape)}")
            dice = soft_dice_loss(logits, target, batch_dice=self.batch_dice,
                                  include_background=self.include_background, smooth=self.smooth)
            ce = F.cross_entropy(logits.float(), target[:, 0].long())
            dice_total = weight * dice if dice_total is None else dice_total + weight * dice
            ce_total = weight * ce if ce_total is None else ce_total + weight * ce
        seg = self.weight_dice * dice_total + self.weight_ce * ce_total
        return {"seg": seg, "dice": dice_total, "ce": ce_total}

    def extra_repr(self) -> str:
        return (f"weight_dice={self.weight_dice}, weight_ce={self.weight_ce}, batch_dice={self.batch_dice}, "
                f"include_background={self.include_background}, smooth={self.smooth}, "
                f"deep_supervision={self.deep_supervision}, "
                f"deep_supervision_weights={self.deep_supervision_weights}")
