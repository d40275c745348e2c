"""The fingerprint of a dataset and the plan derived from it, as plain dataclasses stored in JSON.

Every spatial triple here is in tensor axis order (z, y, x).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pancreas_mtl.raw.layout import DEFAULT_LABELS
from pancreas_mtl.planning import anisotropy
from pancreas_mtl.planning.anisotropy import ANISOTROPY_THRESHOLD

# DEFAULT_LABELS: the labels of a dataset that does not name its own (dataset discovery's, the one
# place they are written). Code that needs the lesion's value takes it from the plan
# (``plan.labels["lesion"]``); LESION_LABEL is the default only where no plan is at hand.
LESION_LABEL = DEFAULT_LABELS["lesion"]
# the network kinds a plan's topology can be for (Plan.network): the ResEnc UNet and nnU-Net's PlainConvUNet
NETWORKS = ("resenc", "plainconv")


@dataclass
class ChannelIntensity:
    """Foreground intensity statistics of one input channel (voxels under label > 0)."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    median: float
    min: float
    max: float


@dataclass
class Fingerprint:
    """What planning needs to know about a dataset, computed once and stored as fingerprint.json.

    Attributes:
        case_ids: labelled cases the fingerprint was computed on, sorted.
        spacings: per case voxel spacing (z, y, x) in mm.
        shapes_after_crop: per case shape (z, y, x) after cropping to the nonzero region.
        intensity: per channel foreground statistics.
        label_voxel_counts: {label: voxels} over all cases.
        subtype_counts: {subtype: cases}; empty when the dataset has no subtypes.
        source_signature: hash of the source files' names, sizes and modification times.
    """

    case_ids: list[str]
    spacings: list[tuple[float, float, float]]
    shapes_after_crop: list[tuple[int, int, int]]
    intensity: list[ChannelIntensity]
    label_voxel_counts: dict[int, int]
    subtype_counts: dict[int, int]
    source_signature: str = ""
    channel_names: dict[int, str] = field(default_factory=lambda: {0: "CT"})
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Fingerprint":
        data = dict(data)
        data["spacings"] = [tuple(float(v) for v in s) for s in data["spacings"]]
        data["shapes_after_crop"] = [tuple(int(v) for v in s) for s in data["shapes_after_crop"]]
        data["intensity"] = [ChannelIntensity(**c) for c in data["intensity"]]
        data["label_voxel_counts"] = {int(k): int(v) for k, v in data["label_voxel_counts"].items()}
        data["subtype_counts"] = {int(k): int(v) for k, v in data["subtype_counts"].items()}
        data["channel_names"] = {int(k): v for k, v in data.get("channel_names", {0: "CT"}).items()}
        return cls(**data)


class PlanError(ValueError):
    """A plan field that does not hold the plain value it should: names the file (when known) and the field."""

    def __init__(self, field_name: str, message: str, source: str | Path | None = None):
        self.field_name, self.message, self.source = field_name, message, source
        where = [str(source)] if source else []
        where.append(f"plan field {field_name}" if field_name else "plan")
        super().__init__(f"{': '.join(where)}: {message}")

    def in_file(self, source: str | Path) -> "PlanError":
        """The same error, now naming the file the plan was read from (unless it names one already)."""
        return self if self.source else PlanError(self.field_name, self.message, source)


@dataclass
class ChannelNormalization:
    """How one channel is normalised: ``ct`` clips to [clip_low, clip_high] then z-scores with mean/std;
    ``zscore`` z-scores each case with its own statistics (clip and mean/std unused)."""

    scheme: str
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class Plan:
    """An experiment plan: preprocessing geometry and normalisation, patch and batch, network topology.

    Attributes:
        preset: the planning preset it was made for ("M", "L", "small", ...).
        target_spacing: (z, y, x) mm every case is resampled to.
        median_shape: (z, y, x) median case shape after resampling.
        patch_size: (z, y, x) training patch; divisible by the product of strides per axis.
        batch_size: patches per training step.
        normalization: one entry per input channel.
        kernel_sizes: per stage conv kernel (z, y, x).
        strides: per stage stride (z, y, x); stage 0 is (1, 1, 1).
        features_per_stage: channels per stage.
        n_blocks_per_stage: residual blocks per encoder stage.
        n_conv_per_stage_decoder: convs per decoder stage (one per stage but the deepest).
        num_input_channels, num_classes, num_subtypes: network input and outputs.
        labels: {name: value} of the segmentation.
        anisotropy_threshold: spacing ratio (coarsest / finest) above which a grid is anisotropic and its
            coarse axis is resampled separately (``planning.anisotropy.separate_axis``, decided per case
            from the case's and the plan's spacing, in preprocessing and export).
        network: the network kind the topology is for: "resenc" (residual encoder UNet, ``n_blocks_per_stage``
            residual blocks) or "plainconv" (nnU-Net's default PlainConvUNet, ``n_blocks_per_stage`` convs);
            the backbone config must build the same kind. Plans written before it read as "resenc".

    ``anisotropic_axis`` (a property, also written by ``to_dict``) is the axis the plan's grid alone
    makes separate; resampling decides per case.
    """

    preset: str
    target_spacing: tuple[float, float, float]
    median_shape: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    batch_size: int
    normalization: list[ChannelNormalization]
    kernel_sizes: list[tuple[int, int, int]]
    strides: list[tuple[int, int, int]]
    features_per_stage: list[int]
    n_blocks_per_stage: list[int]
    n_conv_per_stage_decoder: list[int]
    num_input_channels: int = 1
    num_classes: int = 3
    num_subtypes: int = 3
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    network: str = "resenc"

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def anisotropic_axis(self) -> int | None:
        """The axis (0=z) of the target grid coarser than ``anisotropy_threshold`` x its finest, or None."""
        return anisotropy.anisotropic_axis(self.target_spacing, self.anisotropy_threshold)

    def to_dict(self) -> dict:
        """The fields, plus the derived ``anisotropic_axis`` for readers of plan.json (``from_dict`` ignores it)."""
        return {**asdict(self), "anisotropic_axis": self.anisotropic_axis}

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "Plan":
        """The plan ``to_dict`` wrote (plan.json, a checkpoint's plan). Every field must be the plain value
        it holds; anything else (a Hydra ``_target_`` node, a mapping where a number belongs) is a
        PlanError naming ``source`` (the file it was read from, when the caller knows it) and the field."""
        if not isinstance(data, dict):
            raise PlanError("", f"expected a plan (a mapping of its fields), found {_describe(data)}", source)
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items()
                   if name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise PlanError("", f"lacks the field(s) {missing}", source)
        # absent from plans written before they were plan values: anisotropy_threshold, network keep defaults
        return cls(**{name: _read_field(name, data[name], source) for name in known if name in data})

    def preprocessing_key(self) -> str:
        """Short hash of what the preprocessed voxels depend on (spacing, separate-axis threshold,
        normalisation, channels)."""
        # anisotropic_axis follows from the spacing and threshold; it stays in for existing caches' keys
        relevant = {"target_spacing": self.target_spacing, "anisotropic_axis": self.anisotropic_axis,
                    "normalization": [asdict(n) for n in self.normalization],
                    "num_input_channels": self.num_input_channels}
        if self.anisotropy_threshold != ANISOTROPY_THRESHOLD:
            # hashed only when not nnU-Net's default, so caches built before it was a plan value stay valid
            relevant["anisotropy_threshold"] = self.anisotropy_threshold
        return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


# --- reading a stored plan: each field as the plain value it holds ---------------------------------------

DIRECTIVE = " (a Hydra directive: a plan holds plain values only)"


def _is_directive(key: Any) -> bool:
    return str(key).startswith("_") and str(key).endswith("_")


def _describe(value: Any) -> str:
    if isinstance(value, dict) and any(_is_directive(key) for key in value):
        return f"a mapping with {', '.join(sorted(str(k) for k in value if _is_directive(k)))}{DIRECTIVE}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _number(value: Any, kind: type, where: str, source: str | Path | None) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(where, f"expected a number, found {_describe(value)}", source)
    return kind(value)


def _numbers(value: Any, kind: type, where: str, source: str | Path | None, length: int | None = None) -> list:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        expected = f"a list of {length} numbers" if length else "a list of numbers"
        raise PlanError(where, f"expected {expected}, found {_describe(value)}", source)
    return [_number(v, kind, f"{where}[{i}]", source) for i, v in enumerate(value)]


def _entries(value: Any, where: str, source: str | Path | None) -> list:
    if not isinstance(value, (list, tuple)):
        raise PlanError(where, f"expected a list, found {_describe(value)}", source)
    return list(value)


def _normalization(value: Any, where: str, source: str | Path | None) -> ChannelNormalization:
    names = [f.name for f in fields(ChannelNormalization)]
    if not isinstance(value, dict):
        raise PlanError(where, f"expected a mapping of {names}, found {_describe(value)}", source)
    unexpected = sorted(str(key) for key in value if key not in names)
    if unexpected:
        why = DIRECTIVE if any(_is_directive(key) for key in unexpected) else ""
        raise PlanError(where, f"unexpected key(s) {unexpected}{why}; expected {names}", source)
    if not isinstance(value.get("scheme"), str):
        raise PlanError(f"{where}.scheme", f"expected a string, found {_describe(value.get('scheme'))}", source)
    numbers = {key: None if value.get(key) is None else _number(value[key], float, f"{where}.{key}", source)
               for key in names if key != "scheme"}
    return ChannelNormalization(value["scheme"], **numbers)


def _read_field(name: str, value: Any, source: str | Path | None) -> Any:
    """Field ``name`` of a stored plan as the type ``Plan`` holds; PlanError for anything else."""
    if name in ("target_spacing", "median_shape", "patch_size"):
        return tuple(_numbers(value, float if name == "target_spacing" else int, name, source, length=3))
    if name in ("kernel_sizes", "strides"):
        return [tuple(_numbers(entry, int, f"{name}[{i}]", source, length=3))
                for i, entry in enumerate(_entries(value, name, source))]
    if name in ("features_per_stage", "n_blocks_per_stage", "n_conv_per_stage_decoder"):
        return _numbers(value, int, name, source)
    if name == "normalization":
        return [_normalization(entry, f"{name}[{i}]", source) for i, entry in enumerate(_entries(value, name, source))]
    if name == "labels":
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise PlanError(name, f"expected a mapping of label names to values, found {_describe(value)}", source)
        return {key: _number(v, int, f"{name}.{key}", source) for key, v in value.items()}
    if name == "preset":
        if not isinstance(value, str):
            raise PlanError(name, f"expected a string, found {_describe(value)}", source)
        return value
    if name == "network":
        if value not in NETWORKS:
            raise PlanError(name, f"expected one of {list(NETWORKS)}, found {_describe(value)}", source)
        return value
    return _number(value, float if name == "anisotropy_threshold" else int, name, source)
