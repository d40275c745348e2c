"""Lesion subtype loss on patch-level class logits: cross-entropy, or one-vs-rest BCE, with sample selection.

Which patches teach the classifier (``no_lesion_policy``):

- ``skip`` (conf/loss/default.yaml's): only patches that contain lesion voxels (the plan's lesion label)
  count. The subtype is a property of the lesion, so a patch without lesion carries no evidence for it; training
  on it with the case's label teaches the head to read the subtype off surrounding pancreas and fat,
  which does not generalise and pulls the head towards the class prior, i.e. the majority-subtype
  collapse others reported on this data. Skipping costs little here: every case has a lesion and the
  plan's patch (64 x 128 x 192) is larger than the median resampled case (59 x 118 x 181), so most
  patches hold the whole lesion; on smaller patches raise ``sampling.lesion_centred_probability`` so
  batches keep lesion patches. A batch with no lesion patch contributes 0 (with a grad_fn), not NaN.
- ``case_label``: every patch with a known subtype counts with its case's label, lesion or not (what a
  case-level head trained on random patches does). Use it when patches nearly always hold the lesion
  anyway or to compare.

A subtype of -1 (unknown) is never used. Class imbalance: ``class_weights`` multiplies each sample's
loss by its class weight, ``inverse_frequency`` gives w_c = N / (K * n_c) from the training split's
subtype counts (mean weight over the training cases is 1, so the loss keeps its scale; 62 / 106 / 84
cases give 1.35 / 0.79 / 1.00). With ``sampling.subtype_balanced`` the sampler already balances
subtypes: leave ``class_weights`` null then, or the correction is applied twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NO_LESION_POLICIES = ("skip", "case_label")
CLASSIFICATION_KINDS = ("ce", "bce")
REDUCTIONS = ("sample_mean", "weight_mean")
UNKNOWN_SUBTYPE = -1


def subtype_count_list(subtype_counts: Sequence[int] | Mapping, num_classes: int) -> list[int]:
    """Cases per subtype as a list indexed by subtype.

    Accepts a list (index = subtype) or a mapping ``{subtype: cases}`` whose keys may be ints or strings
    (as read back from JSON, e.g. ``Fingerprint.subtype_counts``); the unknown subtype -1 is ignored.
    """
    if isinstance(subtype_counts, Mapping):
        counts = [0] * num_classes
        for key, value in subtype_counts.items():
            subtype = int(key)
            if subtype == UNKNOWN_SUBTYPE:
                continue
            if not 0 <= subtype < num_classes:
                raise ValueError(f"subtype_counts has subtype {subtype}, expected 0..{num_classes - 1}")
            counts[subtype] = int(value)
    else:
        counts = [int(v) for v in subtype_counts]
        if len(counts) != num_classes:
            raise ValueError(f"subtype_counts has {len(counts)} entries, expected one per class "
                             f"({num_classes})")
    if min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"subtype_counts must be non-negative with at least one case, got {counts}")
    return counts


def inverse_frequency_weights(counts: Sequence[int]) -> list[float]:
    """w_c = N / (K * n_c) over the K classes present (scikit-learn's "balanced"); absent classes get 0.

    An absent class has no training sample to weigh, so its weight never matters; 0 avoids infinity.
    """
    present = [c for c in counts if c > 0]
    total = sum(present)
    return [total / (len(present) * c) if c > 0 else 0.0 for c in counts]


def inverse_frequency_pos_weight(counts: Sequence[int]) -> list[float]:
    """One-vs-rest positive weights n_negative / n_positive per class (1 where a class has no case)."""
    total = sum(counts)
    return [(total - c) / c if c > 0 else 1.0 for c in counts]


def _weights_from_option(option, counts: Sequence[int] | Mapping | None, num_classes: int, name: str,
                         from_counts) -> Tensor | None:
    if option is None:
        return None
    if isinstance(option, str):
        if option != "inverse_frequency":
            raise ValueError(f"{name} must be null, a list of {num_classes} numbers or 'inverse_frequency', "
                             f"got {option!r}")
        if counts is None:
            raise ValueError(f"{name}='inverse_frequency' needs the training split's subtype counts: pass "
                             f"subtype_counts=[n_0, ..., n_{num_classes - 1}] (or a {{subtype: cases}} "
                             f"mapping) "
                             f"when instantiating the loss")
        return torch.tensor(from_counts(subtype_count_list(counts, num_classes)), dtype=torch.float32)
    weights = [float(w) for w in option]
    if len(weights) != num_classes or min(weights) < 0:
        raise ValueError(f"{name} must have {num_classes} non-negative entries, got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Subtype loss on class logits, over the samples that ``no_lesion_policy`` keeps.

    Args:
        num_classes: subtypes K (3 here).
        kind: ``ce`` (softmax cross-entropy, a K-way head) or ``bce`` (K independent sigmoid
            one-vs-rest outputs against one-hot targets, for the one-vs-rest head); the same names as
            the heads' ``loss_kind``, so ``kind=model.head.loss_kind`` can be passed at instantiate time.
        class_weights: ``None``, a list of K weights, or ``"inverse_frequency"`` (needs ``subtype_counts``).
            Each sample's loss is multiplied by the weight of its class.
        subtype_counts: training cases per subtype (list indexed by subtype, or ``{subtype: cases}``);
            only read for ``"inverse_frequency"`` options. Data-dependent: pass it at instantiate time.
        label_smoothing: eps; CE targets become (1 - eps) one-hot + eps / K, BCE targets
            (1 - eps) one-hot + eps / 2.
        pos_weight: ``bce`` only: ``None``, K weights of the positive term, or ``"inverse_frequency"``
            (n_negative / n_positive per class, from ``subtype_counts``).
        no_lesion_policy: ``skip`` or ``case_label``; see the module docstring.
        reduction: ``sample_mean``: sum of weighted sample losses / number of samples kept.
            ``weight_mean``: / sum of the kept samples' weights (torch's weighted mean). With nnU-Net's
            batch of 2, ``weight_mean`` cancels the class weight whenever the kept samples share a
            class (always, with one), so class weights would do almost nothing; ``sample_mean`` keeps
            their effect in expectation.

    The values are conf/loss/default.yaml's ``cls_loss`` (``skip``, ``sample_mean``, inverse-frequency class
    weights); none has a default here.

    ``forward(class_logits, subtype, has_lesion)``: ``class_logits`` (B, K), ``subtype`` (B,) int with -1
    unknown, ``has_lesion`` (B,) bool (needed for ``skip``). Returns a scalar tensor; 0 with a grad_fn
    when no sample is kept.
    """

    def __init__(self, num_classes: int, kind: str, class_weights: Sequence[float] | str | None,
                 subtype_counts: Sequence[int] | Mapping | None, label_smoothing: float,
                 pos_weight: Sequence[float] | str | None, no_lesion_policy: str, reduction: str):
        super().__init__()
        if kind not in CLASSIFICATION_KINDS:
            raise ValueError(f"kind must be one of {CLASSIFICATION_KINDS}, got {kind!r}")
        if no_lesion_policy not in NO_LESION_POLICIES:
            raise ValueError(f"no_lesion_policy must be one of {NO_LESION_POLICIES}, got {no_lesion_policy!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if pos_weight is not None and kind != "bce":
            raise ValueError(f"pos_weight applies to kind='bce' only, got kind={kind!r}")
        self.num_classes = int(num_classes)
        self.kind = kind
        self.label_smoothing = float(label_smoothing)
        self.no_lesion_policy = no_lesion_policy
        self.reduction = reduction
        # not persistent: loss settings are config, not weights; a checkpoint loads under other settings
        self.register_buffer("class_weights", _weights_from_option(
            class_weights, subtype_counts, self.num_classes, "class_weights", inverse_frequency_weights),
            persistent=False)
        self.register_buffer("pos_weight", _weights_from_option(
            pos_weight, subtype_counts, self.num_classes, "pos_weight", inverse_frequency_pos_weight),
            persistent=False)

    def sample_mask(self, subtype: Tensor, has_lesion: Tensor | None = None) -> Tensor:
        """(B,) bool: the samples this loss learns from (known subtype, and a lesion for ``skip``)."""
        keep = subtype != UNKNOWN_SUBTYPE
        if self.no_lesion_policy == "skip":
            if has_lesion is None:
                raise ValueError("no_lesion_policy='skip' needs has_lesion (B,) bool: whether each patch "
                                 "holds lesion voxels")
            keep = keep & has_lesion.to(device=keep.device, dtype=torch.bool).reshape(keep.shape)
        return keep

    def per_sample_loss(self, class_logits: Tensor, subtype: Tensor) -> Tensor:
        """(N,) unweighted loss of each sample; ``subtype`` must be in [0, K)."""
        logits = class_logits.float()
        one_hot = F.one_hot(subtype.long(), self.num_classes).to(logits.dtype)
        eps = self.label_smoothing
        if self.kind == "ce":
            target = one_hot * (1 - eps) + eps / self.num_classes
            return -(target * torch.log_softmax(logits, dim=1)).sum(1)
        target = one_hot * (1 - eps) + eps / 2
        per_output = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        return per_output.mean(1)

    def forward(self, class_logits: Tensor, subtype: Tensor, has_lesion: Tensor | None = None) -> Tensor:
        if class_logits.ndim != 2 or class_logits.shape[1] != self.num_classes:
            raise ValueError(f"class_logits must be (B, {self.num_classes}), got {tuple(class_logits.shape)}")
        subtype = subtype.to(class_logits.device).reshape(-1)
        if subtype.shape[0] != class_logits.shape[0]:
            raise ValueError(f"{subtype.shape[0]} subtypes for {class_logits.shape[0]} class logits")
        if subtype.numel() and (int(subtype.max()) >= self.num_classes or int(subtype.min()) < UNKNOWN_SUBTYPE):
            raise ValueError(f"subtypes must be -1 (unknown) or 0..{self.num_classes - 1}, "
                             f"got {subtype.tolist()}")
        keep = self.sample_mask(subtype, has_lesion)
        if not bool(keep.any()):
            # still part of the graph, so backward and DDP see the head
            return class_logits.sum() * 0.0
        kept_subtype = subtype[keep]
        losses = self.per_sample_loss(class_logits[keep], kept_subtype)
        if self.class_weights is None:
            return losses.mean()
        weights = self.class_weights.to(losses.device)[kept_subtype]
        if self.reduction == "sample_mean":
            return (weights * losses).sum() / losses.shape[0]
        return (weights * losses).sum() / weights.sum().clamp_min(1e-12)

    def extra_repr(self) -> str:
        weights = None if self.class_weights is None else [round(w, 4) for w in self.class_weights.tolist()]
        pos = None if self.pos_weight is None else [round(w, 4) for w in self.pos_weight.tolist()]
        return (f"kind={self.kind}, num_classes={self.num_classes}, class_weights={weights}, pos_weight={pos}, "
                f"label_smoothing={self.label_smoothing}, no_lesion_policy={self.no_lesion_policy}, "
                f"reduction={self.reduction}")
