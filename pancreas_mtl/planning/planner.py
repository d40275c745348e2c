"""The experiment planner: nnU-Net v2's planning rules, from a dataset fingerprint to a Plan.

The rules are those of nnunetv2's ExperimentPlanner (``network: plainconv``, its PlainConvUNet) and
ResEncUNetPlanner (``network: resenc``). ``plan_experiment(fingerprint, preset, overrides)`` is a pure
function. Every rule's constant is a preset value (``conf/planning/{M,L,small,plainconv}.yaml``), and
every plan value can be overridden. Every spatial triple is in tensor axis order (z, y, x); unlike
nnU-Net we never transpose axes, the rules are the same for every axis.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import numpy as np

from pancreas_mtl.config import config_dir
from pancreas_mtl.planning.plan import NETWORKS, ChannelNormalization, Fingerprint, Plan
from pancreas_mtl.planning.topology import (
    Topology,
    conv_and_pool_topology,
    feature_map_voxels,
    features_per_stage,
    per_stage,
    plainconv_feature_map_voxels,
    stage_shapes,
)

PRESET_KEYS = (
    "name", "network",
    "spacing_percentile", "anisotropy_threshold", "anisotropic_spacing_percentile", "spacing_scale",
    "channel_normalization", "default_normalization",
    "initial_patch_edge", "featuremap_min_edge_length", "max_stages",
    "base_features", "max_features", "blocks_per_stage_encoder", "conv_per_stage_decoder",
    "vram_target_gb", "reference_vram_gb", "reference_feature_map_voxels", "reference_batch_size",
    "min_batch_size", "max_batch_size", "max_dataset_fraction_per_batch",
)
# plan values that an override sets directly instead of deriving them
PLAN_OVERRIDE_KEYS = ("target_spacing", "patch_size", "batch_size")


def load_preset(name: str) -> dict:
    """The planning preset ``conf/planning/{name}.yaml`` (package data, :func:`~pancreas_mtl.config.config_dir`)
    as a plain dict."""
    from omegaconf import OmegaConf

    folder = config_dir() / "planning"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"no planning preset {name!r}: {path} does not exist (known: {known})")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    preset.setdefault("name", name)
    return preset


def _as_dict(config: Mapping | Any | None) -> dict:
    """A deep plain-dict copy of a dict or DictConfig."""
    if config is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return copy.deepcopy(dict(config))


def resolve_preset(preset: Mapping, overrides: Mapping | None = None) -> tuple[dict, dict]:
    """Split ``overrides`` into preset knobs (merged into the preset) and plan values; check names.

    Returns:
        (preset with knob overrides applied, {plan value: override}).
    """
    preset, overrides = _as_dict(preset), _as_dict(overrides)
    missing = [k for k in PRESET_KEYS if k not in preset]
    if missing:
        raise KeyError(f"planning preset {preset.get('name', '?')!r} lacks {missing}")
    unknown = sorted(set(overrides) - set(PRESET_KEYS) - set(PLAN_OVERRIDE_KEYS))
    if unknown:
        raise KeyError(f"unknown planning override(s) {unknown}; expected plan values "
                       f"{list(PLAN_OVERRIDE_KEYS)} or preset knobs {list(PRESET_KEYS)}")
    plan_values = {k: v for k, v in overrides.items() if k in PLAN_OVERRIDE_KEYS and v is not None}
    preset.update({k: v for k, v in overrides.items() if k in PRESET_KEYS})
    if preset["network"] not in NETWORKS:
        raise ValueError(f"planning preset {preset['name']!r}: network {preset['network']!r} is not one of "
                         f"{list(NETWORKS)}")
    return preset, plan_values


def _check_fingerprint(fingerprint: Fingerprint) -> None:
    if not fingerprint.spacings:
        raise ValueError("the fingerprint has no cases; planning needs at least one")
    if not fingerprint.intensity:
        raise ValueError("the fingerprint has no channel intensity statistics; planning needs one per channel")
    if len(fingerprint.spacings) != len(fingerprint.shapes_after_crop):
        raise ValueError(f"fingerprint has {len(fingerprint.spacings)} spacings but "
                         f"{len(fingerprint.shapes_after_crop)} shapes")
    for case, spacing, shape in zip(fingerprint.case_ids or [None] * len(fingerprint.spacings),
                                    fingerprint.spacings, fingerprint.shapes_after_crop):
        if len(spacing) != 3 or len(shape) != 3 or min(spacing) <= 0 or min(shape) <= 0:
            raise ValueError(f"case {case}: expected a positive (z, y, x) spacing and shape, found spacing "
                             f"{tuple(spacing)} and shape {tuple(shape)}")


def fingerprint_target_spacing(fingerprint: Fingerprint, preset: Mapping) -> tuple[float, float, float]:
    """Target spacing (z, y, x): the per-axis median of the case spacings, finer along a rare coarse axis.

    nnU-Net (ExperimentPlanner.determine_fullres_target_spacing): when the coarsest axis' spacing
    exceeds ``anisotropy_threshold`` times every other axis' spacing *and* that axis has fewer than
    1/threshold the voxels of every other axis, resampling to the median interpolates badly across
    so few slices (nnU-Net's example: ACDC, 10 x 1.5 x 1.5 mm); then that axis takes the 10th
    percentile of its spacings, never finer than the other axes. ``spacing_scale`` is applied last.
    """
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    shapes = np.asarray(fingerprint.shapes_after_crop, dtype=float)
    target = np.percentile(spacings, preset["spacing_percentile"], axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    threshold = preset["anisotropy_threshold"]
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    anisotropic_spacing = target[coarse] > threshold * max(target[others])
    few_voxels = median_shape[coarse] * threshold < min(median_shape[others])
    if anisotropic_spacing and few_voxels:
        finer = float(np.percentile(spacings[:, coarse], preset["anisotropic_spacing_percentile"]))
        # never finer than the other axes (nnU-Net adds 1e-5 to keep the coarse axis unique)
        target[coarse] = finer if finer >= max(target[others]) else max(target[others]) + 1e-5
    return tuple(float(t) * float(preset["spacing_scale"]) for t in target)


def resampled_median_shape(fingerprint: Fingerprint,
                           target_spacing: tuple[float, float, float]) -> np.ndarray:
    """Median (z, y, x) case shape after cropping and resampling to ``target_spacing`` (may be fractional)."""
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    shapes = np.asarray(fingerprint.shapes_after_crop, dtype=float)
    resampled = np.maximum(1, np.round(shapes * spacings / np.asarray(target_spacing, dtype=float)))
    return np.median(resampled, axis=0)


def channel_normalization(fingerprint: Fingerprint, preset: Mapping) -> list[ChannelNormalization]:
    """One scheme per channel, chosen by channel name (case-insensitive; nnU-Net: "CT" -> CT normalisation).

    ``ct`` clips to the dataset's foreground 0.5 / 99.5 percentiles, then z-scores with the foreground
    mean and std; ``zscore`` z-scores each case with its own statistics.
    """
    by_name = {str(k).lower(): v for k, v in preset["channel_normalization"].items()}
    schemes = []
    for channel, stats in enumerate(fingerprint.intensity):
        name = str(fingerprint.channel_names.get(channel, "")).lower()
        scheme = by_name.get(name, preset["default_normalization"])
        if scheme == "ct":
            schemes.append(ChannelNormalization("ct", clip_low=float(stats.percentile_00_5),
                                                clip_high=float(stats.percentile_99_5),
                                                mean=float(stats.mean), std=float(stats.std)))
        elif scheme == "zscore":
            schemes.append(ChannelNormalization("zscore"))
        else:
            raise ValueError(f"channel {channel} ({name!r}): unknown normalisation scheme {scheme!r}, "
                             "expected 'ct' or 'zscore'")
    return schemes


def network_sizes(num_stages: int, preset: Mapping) -> tuple[list[int], list[int], list[int]]:
    """(features, encoder blocks (plainconv: convs), decoder convs) per stage of the preset's network."""
    return (features_per_stage(num_stages, int(preset["base_features"]), int(preset["max_features"])),
            per_stage(preset["blocks_per_stage_encoder"], num_stages),
            per_stage(preset["conv_per_stage_decoder"], max(num_stages - 1, 0)) if num_stages > 1 else [])


def estimate_feature_map_voxels(topology: Topology, preset: Mapping, num_classes: int) -> int:
    """nnU-Net's memory proxy for one patch of ``topology`` with the preset's network sizes."""
    features, blocks, decoder = network_sizes(topology.num_stages, preset)
    estimate = plainconv_feature_map_voxels if preset["network"] == "plainconv" else feature_map_voxels
    return estimate(topology.patch_size, topology.strides, features, blocks, decoder, num_classes)


def feature_map_budget(preset: Mapping) -> float:
    """The reference feature-map voxels scaled to the preset's GPU memory target."""
    return preset["reference_feature_map_voxels"] * preset["vram_target_gb"] / preset["reference_vram_gb"]


def _topology(spacing, patch_size, preset: Mapping) -> Topology:
    return conv_and_pool_topology(spacing, patch_size, int(preset["featuremap_min_edge_length"]),
                                  preset["max_stages"])


def initial_patch_size(target_spacing, median_shape, preset: Mapping) -> np.ndarray:
    """nnU-Net's starting patch: ``initial_patch_edge``^3 voxels shaped like 1/spacing (isotropic in mm),
    clipped to the median shape."""
    inverse = 1.0 / np.asarray(target_spacing, dtype=float)
    volume = float(preset["initial_patch_edge"]) ** 3
    patch = np.round(inverse * (volume / np.prod(inverse)) ** (1 / 3))
    return np.minimum(patch, median_shape)


def fit_patch_size(target_spacing, median_shape, preset: Mapping, num_classes: int) -> tuple[Topology, int]:
    """Largest patch nnU-Net's search allows within the preset's memory budget, and its estimate.

    Starting from ``initial_patch_size``, the axis whose patch is largest relative to the median shape
    is shrunk (ties: the last axis) until the estimated feature-map voxels fit the budget. Each step
    removes one divisibility unit of the shrunk patch, so no valid size is skipped.
    """
    median_shape = np.asarray(median_shape, dtype=float)
    topology = _topology(target_spacing, initial_patch_size(target_spacing, median_shape, preset), preset)
    estimate = estimate_feature_map_voxels(topology, preset, num_classes)
    budget = feature_map_budget(preset)
    while estimate > budget:
        patch = list(topology.patch_size)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = max(range(3), key=lambda a: (ratios[a], a))
        if patch[axis] <= 1:
            raise ValueError(f"no patch fits the memory budget of preset {preset['name']!r} "
                             f"({budget:.3g} feature-map voxels) at spacing {target_spacing}")
        # the divisibility unit of the smaller patch, not of the current one (nnU-Net's two-step)
        trial = list(patch)
        trial[axis] -= topology.divisor[axis]
        step = _topology(target_spacing, [max(t, 1) for t in trial], preset).divisor[axis]
        patch[axis] = max(1, patch[axis] - step)
        shrunk = _topology(target_spacing, patch, preset)
        if shrunk.patch_size == topology.patch_size:
            raise RuntimeError(f"patch search stalled at {topology.patch_size} (preset {preset['name']!r})")
        topology = shrunk
        estimate = estimate_feature_map_voxels(topology, preset, num_classes)
    return topology, estimate


def batch_size_for(estimate: int, patch_size, dataset_voxels: float, preset: Mapping) -> int:
    """nnU-Net's batch size: the memory headroom times the reference batch size, capped so one batch
    covers at most ``max_dataset_fraction_per_batch`` of the dataset's voxels, and at least
    ``min_batch_size`` (then ``max_batch_size`` if set)."""
    from_budget = round(feature_map_budget(preset) / estimate * preset["reference_batch_size"])
    cap = round(dataset_voxels * preset["max_dataset_fraction_per_batch"] / math.prod(patch_size))
    batch = max(min(from_budget, cap), int(preset["min_batch_size"]))
    if preset["max_batch_size"] is not None:
        batch = min(batch, int(preset["max_batch_size"]))
    return int(batch)


def _triple(values, kind: type, what: str) -> tuple:
    values = tuple(kind(v) for v in values)
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"override {what} must be three positive numbers (z, y, x), got {values}")
    return values


def plan_experiment(fingerprint: Fingerprint, preset: Mapping | Any,
                    overrides: Mapping | None = None) -> Plan:
    """Plan an experiment for a dataset: spacing, normalisation, patch, batch and network topology.

    Args:
        fingerprint: the dataset's fingerprint.
        preset: a planning preset (``load_preset("M")``, a dict or a DictConfig with every key of
            ``PRESET_KEYS``).
        overrides: optional values that win over the rules: ``target_spacing`` (used as is, median
            shape and everything after follow), ``patch_size`` (padded up to the divisibility of the
            topology recomputed for it), ``batch_size``, or any preset knob (``spacing_scale``,
            ``vram_target_gb``, ``max_stages``, ...).
    """
    preset, plan_values = resolve_preset(preset, overrides)
    _check_fingerprint(fingerprint)

    if "target_spacing" in plan_values:
        target_spacing = _triple(plan_values["target_spacing"], float, "target_spacing")
    else:
        target_spacing = fingerprint_target_spacing(fingerprint, preset)
    median_shape = resampled_median_shape(fingerprint, target_spacing)
    num_classes = len(fingerprint.labels)

    if "patch_size" in plan_values:
        topology = _topology(target_spacing, _triple(plan_values["patch_size"], int, "patch_size"), preset)
        estimate = estimate_feature_map_voxels(topology, preset, num_classes)
    else:
        topology, estimate = fit_patch_size(target_spacing, median_shape, preset, num_classes)

    if "batch_size" in plan_values:
        batch_size = int(plan_values["batch_size"])
        if batch_size < 1:
            raise ValueError(f"override batch_size must be at least 1, got {batch_size}")
    else:
        dataset_voxels = float(np.prod(median_shape)) * len(fingerprint.spacings)
        batch_size = batch_size_for(estimate, topology.patch_size, dataset_voxels, preset)

    features, blocks, decoder = network_sizes(topology.num_stages, preset)
    subtypes = fingerprint.subtype_counts
    return Plan(
        preset=str(preset["name"]),
        target_spacing=tuple(float(s) for s in target_spacing),
        median_shape=tuple(int(round(m)) for m in median_shape),
        patch_size=topology.patch_size,
        batch_size=batch_size,
        normalization=channel_normalization(fingerprint, preset),
        kernel_sizes=topology.kernel_sizes,
        strides=topology.strides,
        features_per_stage=features,
        n_blocks_per_stage=blocks,
        n_conv_per_stage_decoder=decoder,
        num_input_channels=len(fingerprint.intensity),
        num_classes=num_classes,
        num_subtypes=(max(subtypes) + 1) if subtypes else 0,
        labels=dict(fingerprint.labels),
        anisotropy_threshold=float(preset["anisotropy_threshold"]),
        network=str(preset["network"]),
    )


def describe_plan(plan: Plan) -> str:
    """A human-readable summary of a plan, one table row per network stage, for logs."""
    def triple(values) -> str:
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    axis_names = {0: "z", 1: "y", 2: "x"}
    lines = [
        f"plan (preset {plan.preset}, network {plan.network}), axes (z, y, x)",
        f"  target spacing   {triple(round(s, 4) for s in plan.target_spacing)} mm",
        f"  median shape     {triple(plan.median_shape)}",
        f"  patch size       {triple(plan.patch_size)}",
        f"  batch size       {plan.batch_size}",
        (f"  separate axis    {axis_names.get(plan.anisotropic_axis, 'none')} "
         f"(anisotropy threshold {plan.anisotropy_threshold:g}; resampling decides per case)"),
        f"  inputs/classes   {plan.num_input_channels} channel(s), {plan.num_classes} labels "
        f"{plan.labels}, {plan.num_subtypes} subtypes",
    ]
    for channel, norm in enumerate(plan.normalization):
        detail = (f"clip [{norm.clip_low:g}, {norm.clip_high:g}], mean {norm.mean:g}, std {norm.std:g}"
                  if norm.scheme == "ct" else "per case")
        lines.append(f"  channel {channel}        {norm.scheme}: {detail}")
    lines.append(f"  {'stage':>5}  {'kernel':<9}  {'stride':<9}  {'features':>8}  "
                 f"{'convs' if plan.network == 'plainconv' else 'blocks':>6}  "
                 f"{'decoder':>7}  feature map")
    shapes = stage_shapes(plan.patch_size, plan.strides)
    for stage in range(plan.num_stages):
        # decoder convs are listed deepest first; show each next to the resolution it runs at
        decoder = plan.n_conv_per_stage_decoder[-1 - stage] if stage < plan.num_stages - 1 else "-"
        lines.append(f"  {stage:>5}  {triple(plan.kernel_sizes[stage]):<9}  "
                     f"{triple(plan.strides[stage]):<9}  {plan.features_per_stage[stage]:>8}  "
                     f"{plan.n_blocks_per_stage[stage]:>6}  {decoder:>7}  "
                     f"{triple(shapes[stage])}")
    return "\n".join(lines)
