"""Training losses: nnU-Net's Dice + CE with deep supervision, the subtype loss, and their weighted sum.

Built from ``conf/loss/*.yaml`` with ``hydra.utils.instantiate``; data-dependent values (the training
split's subtype counts, for inverse-frequency weights, and the plan's lesion label) are passed at that
call::

    loss = hydra.utils.instantiate(cfg.loss, cls_loss={"subtype_counts": [62, 106, 84]},
                                   lesion_label=plan.labels["lesion"])
"""

from pancreas_mtl.losses.classification import (
    CLASSIFICATION_KINDS,
    NO_LESION_POLICIES,
    ClassificationLoss,
    inverse_frequency_pos_weight,
    inverse_frequency_weights,
    subtype_count_list,
)
from pancreas_mtl.losses.multitask import MultiTaskLoss
from pancreas_mtl.losses.segmentation import (
    SegmentationLoss,
    deep_supervision_weights,
    downsample_label,
    soft_dice_loss,
)

__all__ = [
    "CLASSIFICATION_KINDS",
    "NO_LESION_POLICIES",
    "ClassificationLoss",
    "MultiTaskLoss",
    "SegmentationLoss",
    "deep_supervision_weights",
    "downsample_label",
    "inverse_frequency_pos_weight",
    "inverse_frequency_weights",
    "soft_dice_loss",
    "subtype_count_list",
]
