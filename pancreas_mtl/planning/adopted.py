"""``planning=from_pretrained``: the plan of a pretrained network, adopted for this dataset.

A network pretrained at one spacing, normalisation and topology fine-tunes best at those, which is why
nnU-Net makes a fine-tuned dataset take the source's plans (``nnUNetv2_move_plans_between_datasets``).
The adopted plan keeps the source plan's target spacing, normalisation per channel, topology (stages,
features, kernel sizes, strides, blocks), network kind, patch and batch size; this dataset gives its
labels, subtype count and median shape. Where the dataset's own plan (the preset named in
``conf/planning/from_pretrained.yaml``) would differ, a warning names each value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from pancreas_mtl.planning.plan import Fingerprint, Plan
from pancreas_mtl.planning.planner import load_preset, plan_experiment, resampled_median_shape

log = logging.getLogger(__name__)

PRESET_NAME = "from_pretrained"
COMPARED = ("network", "target_spacing", "normalization", "patch_size", "batch_size", "kernel_sizes", "strides",
            "features_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder")


def is_adopted(planning_cfg: Mapping | Any) -> bool:
    """Whether a planning config is ``planning=from_pretrained``."""
    return (planning_cfg or {}).get("name") == PRESET_NAME


def plan_differences(adopted: Plan, own: Plan) -> list[str]:
    """``field: pretrained <value>, this dataset's own plan <value>`` for each compared field that differs."""
    lines = []
    for name in COMPARED:
        ours, theirs = getattr(adopted, name, None), getattr(own, name, None)
        if name == "normalization":
            ours, theirs = [dataclasses.asdict(n) for n in ours], [dataclasses.asdict(n) for n in theirs]
        if _plain(ours) != _plain(theirs):
            lines.append(f"{name}: pretrained {_plain(ours)}, this dataset's own plan {_plain(theirs)}")
    return lines


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def adopt_plan(fingerprint: Fingerprint, source_plan: Plan | None, planning_cfg: Mapping,
               source: str = "the pretrained network") -> Plan:
    """This dataset's plan with ``source_plan``'s spacing, normalisation and topology (module docstring).

    Args:
        fingerprint: this dataset's fingerprint.
        source_plan: the pretrained network's plan; None (a state dict has none) is an error.
        planning_cfg: ``conf/planning/from_pretrained.yaml`` (``compare_with``: the preset of this
            dataset's own plan per network kind; ``overrides``: patch_size, batch_size).
        source: the pretrained source, for messages.

    Raises:
        ValueError: no source plan, or a source planned for another number of input channels.
    """
    if source_plan is None:
        raise ValueError(f"planning=from_pretrained takes the plan of the pretrained network, and {source} holds "
                         "none (a plain state dict); name an nnU-Net model folder or checkpoint, or one of our "
                         "checkpoints or model folders, or plan this dataset (planning=M)")
    channels = len(fingerprint.intensity)
    if channels != source_plan.num_input_channels:
        raise ValueError(f"planning=from_pretrained: {source} was planned for {source_plan.num_input_channels} "
                         f"input channel(s), this dataset has {channels}; its normalisation cannot be taken over: "
                         "plan this dataset (planning=M) and warm start with the first convolution re-initialised")
    overrides = {k: v for k, v in dict(planning_cfg.get("overrides") or {}).items() if v is not None}
    unknown = sorted(set(overrides) - {"patch_size", "batch_size"})
    if unknown:
        raise ValueError(f"planning=from_pretrained: planning.overrides {unknown} would change what the pretrained "
                         "network was trained at; only patch_size and batch_size may be overridden")
    subtypes = fingerprint.subtype_counts
    plan = dataclasses.replace(
        source_plan, preset=f"{PRESET_NAME}:{source_plan.preset}",
        median_shape=tuple(int(round(m)) for m in resampled_median_shape(fingerprint, source_plan.target_spacing)),
        num_classes=len(fingerprint.labels), labels=dict(fingerprint.labels),
        num_subtypes=(max(subtypes) + 1) if subtypes else 0,
        batch_size=int(overrides.get("batch_size", source_plan.batch_size)))
    if "patch_size" in overrides:
        divisor = [1, 1, 1]
        for stride in plan.strides:
            divisor = [d * s for d, s in zip(divisor, stride)]
        patch = tuple(int(p) for p in overrides["patch_size"])
        if any(p % d for p, d in zip(patch, divisor)):
            raise ValueError(f"planning.overrides.patch_size={list(patch)} is not divisible by the pretrained "
                             f"network's strides {divisor} (z, y, x)")
        plan = dataclasses.replace(plan, patch_size=patch)
    compare_with = dict(planning_cfg.get("compare_with") or {})
    preset_name = compare_with.get(getattr(plan, "network", "resenc"))
    if preset_name:
        own = plan_experiment(fingerprint, load_preset(preset_name))
        differences = plan_differences(plan, own)
        if differences:
            log.warning("planning=from_pretrained: the plan of %s differs from this dataset's own plan (preset %s) "
                        "in:\n  %s", source, preset_name, "\n  ".join(differences))
    return plan
