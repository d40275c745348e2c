"""The fingerprint of a dataset and the plan derived from it, as plain dataclasses stored in JSON.

Every spatial triple here is in tensor axis order (z, y, x).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from pancreas_mtl.data.layout import DEFAULT_LABELS
from pancreas_mtl.planning import anisotropy
from pancreas_mtl.planning.anisotropy import ANISOTROPY_THRESHOLD

# DEFAULT_LABELS: the labels of a dataset that does not name its own (dataset discovery's, the one
# place they are written). Code that needs the lesion's value takes it from the plan
# (``plan.labels["lesion"]``); LESION_LABEL is the default only where no plan is at hand.
LESION_LABEL = DEFAULT_LABELS["lesion"]


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
    def from_dict(cls, data: dict) -> "Plan":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("target_spacing",):
            data[key] = tuple(float(v) for v in data[key])
        if "anisotropy_threshold" in data:  # absent from plans written before it was a plan value: the default
            data["anisotropy_threshold"] = float(data["anisotropy_threshold"])
        for key in ("median_shape", "patch_size"):
            data[key] = tuple(int(v) for v in data[key])
        for key in ("kernel_sizes", "strides"):
            data[key] = [tuple(int(v) for v in entry) for entry in data[key]]
        data["normalization"] = [ChannelNormalization(**n) for n in data["normalization"]]
        return cls(**data)

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
