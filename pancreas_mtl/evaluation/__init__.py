"""Evaluation: case-level segmentation and subtype classification metrics."""

from pancreas_mtl.evaluation.metrics import (
    ClassificationMetrics,
    accuracy,
    balanced_accuracy,
    binary_auroc,
    confusion_matrix,
    dice,
    lesion_dice,
    macro_auroc,
    macro_f1,
    normalised_surface_dice,
    per_class_auroc,
    per_class_f1,
    per_class_recall,
    segmentation_metrics,
    whole_pancreas_dice,
)

__all__ = [
    "ClassificationMetrics",
    "accuracy",
    "balanced_accuracy",
    "binary_auroc",
    "confusion_matrix",
    "dice",
    "lesion_dice",
    "macro_auroc",
    "macro_f1",
    "normalised_surface_dice",
    "per_class_auroc",
    "per_class_f1",
    "per_class_recall",
    "segmentation_metrics",
    "whole_pancreas_dice",
]
