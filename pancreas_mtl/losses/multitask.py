"""The training objective: segmentation loss + cls_weight x subtype loss (PANDA: 0.3), terms for logging."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pancreas_mtl.losses.classification import ClassificationLoss
from pancreas_mtl.losses.segmentation import SegmentationLoss
from pancreas_mtl.planning.plan import LESION_LABEL


class MultiTaskLoss(nn.Module):
    """``seg_loss + cls_weight * cls_loss`` for a network returning (seg_logits, class_logits).

    Args:
        seg_loss: Dice + CE with deep supervision.
        cls_loss: subtype loss, or ``None`` for segmentation only.
        cls_weight: lambda of the classification term (PANDA: 0.3).
        lesion_label: label value of the lesion (the plan's ``labels["lesion"]``, filled in when the
            module is built); a patch holds a lesion when its full-resolution ``label`` has this value.

    ``seg_loss``, ``cls_loss`` and ``cls_weight`` are conf/loss/default.yaml's keys, with no default here
    (the YAML is their one home); ``lesion_label`` is the plan's.

    Classification is off (``cls`` = 0, no graph) when ``cls_loss`` is ``None``, when the network has no
    head (``class_logits`` is ``None``) or when no ``subtype`` is given.

    ``forward(seg_logits, class_logits, label, subtype=None, has_lesion=None)``:
        seg_logits: list of (B, C, z, y, x), highest resolution first (or one tensor).
        class_logits: (B, K) or ``None``.
        label: (B, 1, Z, Y, X) integer labels at full patch resolution (or the list of per-output labels
            from :func:`downsample_label`).
        subtype: (B,) int64, -1 = unknown.
        has_lesion: ignored (with a DeprecationWarning), kept for callers that pass the batch's flag:
            which patches hold a lesion is read from ``label`` with ``lesion_label``, so the plan's lesion
            label decides, not the one the sampler flagged with.

    Returns a dict of scalar tensors: ``loss`` (to backpropagate), ``seg``, ``dice``, ``ce`` (see
    :class:`SegmentationLoss`; the Dice term is negative, -1 perfect), ``cls`` (unweighted subtype
    loss) and ``cls_samples`` (how many samples the subtype loss used, for logging).
    """

    def __init__(self, seg_loss: SegmentationLoss, cls_loss: ClassificationLoss | None, cls_weight: float,
                 lesion_label: int = LESION_LABEL):
        super().__init__()
        if cls_weight < 0:
            raise ValueError(f"cls_weight must be >= 0, got {cls_weight}")
        self.seg_loss = seg_loss
        self.cls_loss = cls_loss
        self.cls_weight = float(cls_weight)
        self.lesion_label = int(lesion_label)

    def forward(self, seg_logits: Tensor | Sequence[Tensor], class_logits: Tensor | None,
                label: Tensor | Sequence[Tensor], subtype: Tensor | None = None,
                has_lesion: Tensor | None = None) -> dict[str, Tensor]:
        if has_lesion is not None:
            warnings.warn("MultiTaskLoss ignores has_lesion: it reads which patches hold a lesion from label "
                          "with lesion_label; stop passing it", DeprecationWarning)
        terms = self.seg_loss(seg_logits, label)
        seg = terms["seg"]
        if self.cls_loss is None or class_logits is None or subtype is None:
            cls = torch.zeros((), device=seg.device)
            cls_samples = torch.zeros((), device=seg.device)
            loss = seg
        else:
            full_resolution = label if isinstance(label, Tensor) else label[0]   # (B, 1, Z, Y, X)
            has_lesion = (full_resolution == self.lesion_label).flatten(1).any(1)
            cls = self.cls_loss(class_logits, subtype, has_lesion)
            cls_samples = self.cls_loss.sample_mask(subtype.to(class_logits.device).reshape(-1), has_lesion)
            cls_samples = cls_samples.sum().to(torch.float32)
            loss = seg + self.cls_weight * cls
        return {"loss": loss, "seg": seg, "dice": terms["dice"], "ce": terms["ce"], "cls": cls,
                "cls_samples": cls_samples}

    def extra_repr(self) -> str:
        return f"cls_weight={self.cls_weight}, lesion_label={self.lesion_label}"
