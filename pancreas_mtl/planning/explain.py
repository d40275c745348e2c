"""Why the planner chose a plan: the intermediate values of nnU-Net's rules (spacing, patch, topology),
recomputed from the fingerprint and preset with the planner's own functions, as readable lines.

Every spatial triple is (z, y, x).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pancreas_mtl.planning.plan import Fingerprint, Plan
from pancreas_mtl.planning.planner import (
    describe_plan,
    estimate_feature_map_voxels,
    feature_map_budget,
    initial_patch_size,
    plan_experiment,
    resampled_median_shape,
    resolve_preset,
)
from pancreas_mtl.planning.topology import conv_and_pool_topology

AXES = "zyx"


def _triple(values, digits: int = 3) -> str:
    return " x ".join(f"{float(v):.{digits}g}" for v in values)


def explain_spacing(fingerprint: Fingerprint, preset: Mapping) -> list[str]:
    """The target spacing rule, with the numbers that decided it."""
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    shapes = np.asarray(fingerprint.shapes_after_crop, dtype=float)
    percentile = preset["spacing_percentile"]
    target = np.percentile(spacings, percentile, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    threshold = float(preset["anisotropy_threshold"])
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    ratio = target[coarse] / max(target[others])
    voxel_ratio = min(median_shape[others]) / median_shape[coarse]
    lines = [f"spacing: {len(spacings)} case(s), spacing (z, y, x) from {_triple(spacings.min(0))} to "
             f"{_triple(spacings.max(0))} mm; percentile {percentile:g} per axis: {_triple(target)} mm",
             f"  coarsest axis {AXES[coarse]}: {ratio:.2f}x the next coarsest (anisotropy threshold {threshold:g}); "
             f"the other axes hold {voxel_ratio:.2f}x its voxels (cropped median shape {_triple(median_shape)})"]
    if ratio > threshold and median_shape[coarse] * threshold < min(median_shape[others]):
        lines.append(f"  both above the threshold: axis {AXES[coarse]} takes the "
                     f"{preset['anisotropic_spacing_percentile']:g}th percentile of its spacings instead, so few "
                     "slices are not interpolated across too coarsely (nnU-Net's rule)")
    else:
        lines.append("  not both above the threshold: the percentile is the target (nnU-Net's rule)")
    if float(preset["spacing_scale"]) != 1.0:
        lines.append(f"  times spacing_scale {float(preset['spacing_scale']):g}")
    return lines


def explain_plan(fingerprint: Fingerprint, preset: Mapping | Any, overrides: Mapping | None = None
                 ) -> tuple[Plan, str]:
    """(the plan, text explaining each decision): spacing, median shape, patch search, topology, batch."""
    plan = plan_experiment(fingerprint, preset, overrides)
    resolved, plan_values = resolve_preset(preset, overrides)
    lines = [f"preset {resolved['name']!r}; overrides: {plan_values or 'none'}"]
    if "target_spacing" in plan_values:
        lines.append(f"spacing: {_triple(plan.target_spacing)} mm, set by the override target_spacing")
    else:
        lines += explain_spacing(fingerprint, resolved)
    median = resampled_median_shape(fingerprint, plan.target_spacing)
    lines.append(f"median shape at the target spacing: {_triple(median)} voxels")
    budget = feature_map_budget(resolved)
    num_classes = len(fingerprint.labels)
    if "patch_size" in plan_values:
        lines.append(f"patch: {_triple(plan.patch_size)}, the override patch_size padded to the topology's "
                     "divisibility")
    else:
        start = initial_patch_size(plan.target_spacing, median, resolved)
        first = conv_and_pool_topology(plan.target_spacing, start, int(resolved["featuremap_min_edge_length"]),
                                       resolved["max_stages"])
        first_estimate = estimate_feature_map_voxels(first, resolved, num_classes)
        lines.append(f"patch: starts at {_triple(start)} ({resolved['initial_patch_edge']}^3 voxels shaped like "
                     f"1/spacing, isotropic in mm, clipped to the median shape), padded to {_triple(first.patch_size)}")
        lines.append(f"  memory proxy {first_estimate:.3g} feature-map voxels vs the budget {budget:.3g} "
                     f"({resolved['vram_target_gb']} GB preset)")
        if tuple(first.patch_size) != tuple(plan.patch_size):
            shrunk = [AXES[a] for a in range(3) if plan.patch_size[a] < first.patch_size[a]]
            lines.append(f"  over budget: shrunk the axis largest relative to the median shape, step by step "
                         f"(axes {', '.join(shrunk)}), to {_triple(plan.patch_size)}")
        else:
            lines.append("  within the budget: kept")
    pools = [sum(1 for stride in plan.strides if stride[a] == 2) for a in range(3)]
    lines.append(f"topology: {plan.num_stages} stages; axis downsampled {', '.join(f'{AXES[a]} {pools[a]}x' for a in range(3))} "
                 f"(until a feature map edge would fall below {resolved['featuremap_min_edge_length']} voxels, "
                 f"at most {resolved['max_stages']} stages); an axis whose spacing is over 2x the finest gets "
                 "kernel 1 and no stride until in-plane downsampling has caught up")
    lines.append(f"batch size {plan.batch_size}: the memory headroom times the reference batch "
                 f"{resolved['reference_batch_size']}, at least {resolved['min_batch_size']}")
    return plan, "\n".join(lines) + "\n\n" + describe_plan(plan)
