"""Training augmentation: nnU-Net v2's default transforms as a MONAI Compose, every knob a config value.

Input is a dict with ``image`` (C, *region) float32 and ``label`` (1, *region) integer tensors, axes
(Z, Y, X); the region is centred on the patch and at least as large (see :func:`spatial_region_size`).
Output is the same keys at exactly ``patch_size``: image float32, label uint8 with values unchanged
(nearest-neighbour resampling, so {0, 1, 2} stay {0, 1, 2}).

Order and defaults follow ``nnUNetTrainer.get_training_transforms`` (nnunetv2 2.x, batchgeneratorsv2):
rotation and scaling in one resampling, Gaussian noise, Gaussian blur, multiplicative brightness,
contrast, low-resolution simulation, inverted gamma, gamma, mirroring. Groups (config keys):
``spatial``, ``noise_blur``, ``intensity`` (brightness, contrast), ``lowres``, ``gamma``, ``mirror``;
each has ``enabled``. MONAI's transforms are used where they exist; three small ones are written here
(the single-resampling spatial transform, noise with nnU-Net's variance sampling, and a per-channel
probability wrapper).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianSmooth,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolution,
)
from monai.utils import MAX_SEED, ensure_tuple_rep

# nnU-Net v2's defaults; conf/augmentation/nnunet.yaml holds the same values (a test keeps them equal).
NNUNET_DEFAULTS: dict[str, Any] = {
    "name": "nnunet",
    "spatial": {
        "enabled": True,
        "rotation_prob": 0.2,
        "rotation_range_deg": [30.0, 30.0, 30.0],  # max |angle| about the z, y, x axes
        "scaling_prob": 0.2,
        "scaling_range": [0.7, 1.4],  # > 1 reads a larger area: objects shrink (nnU-Net's convention)
        "elastic_prob": 0.0,
        "elastic_scale": [0.0, 0.2],  # smoothness of the deformation, fraction of the patch
        "elastic_magnitude": [0.0, 0.2],  # largest displacement, fraction of the patch
    },
    "noise_blur": {
        "enabled": True,
        "noise_prob": 0.1,
        "noise_variance": [0.0, 0.1],
        "blur_prob": 0.2,
        "blur_sigma": [0.5, 1.0],  # voxels, drawn per axis
        "blur_prob_per_channel": 0.5,
    },
    "intensity": {
        "enabled": True,
        "brightness_prob": 0.15,
        "brightness_range": [0.75, 1.25],
        "contrast_prob": 0.15,
        "contrast_range": [0.75, 1.25],
        "contrast_preserve_range": True,
    },
    "lowres": {
        "enabled": True,
        "prob": 0.25,
        "zoom_range": [0.5, 1.0],
        "prob_per_channel": 0.5,
    },
    "gamma": {
        "enabled": True,
        "prob": 0.3,
        "inverted_prob": 0.1,
        "range": [0.7, 1.5],
        "retain_stats": True,
    },
    "mirror": {
        "enabled": True,
        "prob": 0.5,
        "axes": [0, 1, 2],
    },
}


def resolve_augmentation_config(cfg: Mapping | None) -> dict[str, Any]:
    """nnU-Net's defaults overridden by ``cfg`` (a dict or DictConfig; missing keys keep their default).

    Raises ValueError on a key that does not exist, naming it and the valid ones.
    """
    if cfg is not None and not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    resolved = copy.deepcopy(NNUNET_DEFAULTS)
    for group, values in (cfg or {}).items():
        if group not in resolved:
            raise ValueError(f"unknown augmentation group {group!r}; expected one of {sorted(resolved)}")
        if not isinstance(resolved[group], dict):
            resolved[group] = values
            continue
        for key, value in (values or {}).items():
            if key not in resolved[group]:
                raise ValueError(f"unknown augmentation key {group}.{key}; expected one of {sorted(resolved[group])}")
            resolved[group][key] = value
    return resolved


# ---- spatial ----------------------------------------------------------------------------------------


def _rotation_matrix(angles_zyx: Sequence[float]) -> np.ndarray:
    """Rotation acting on (z, y, x) vectors: about z (the in-plane one), then y, then x; radians."""
    cz, sz = math.cos(angles_zyx[0]), math.sin(angles_zyx[0])
    cy, sy = math.cos(angles_zyx[1]), math.sin(angles_zyx[1])
    cx, sx = math.cos(angles_zyx[2]), math.sin(angles_zyx[2])
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # turns (y, x)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # turns (z, x)
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # turns (z, y)
    return about_x @ about_y @ about_z


def spatial_region_size(patch_size: Sequence[int], rotation_range_deg: Sequence[float] = (0, 0, 0),
                        scaling_range: Sequence[float] = (1.0, 1.0),
                        elastic_magnitude: float = 0.0) -> tuple[int, int, int]:
    """(Z, Y, X) region around a patch that holds every voxel the spatial transform can read.

    The bounding box of the patch under the largest rotations (checked over a grid of angle
    combinations) and the largest scale, plus the largest elastic displacement (fraction of the patch),
    plus one voxel for interpolation; rounded up so ``region - patch`` is even.
    """
    patch = np.asarray(patch_size, dtype=float)
    half = (patch - 1) / 2
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))  # (8, 3)
    steps = [np.linspace(-math.radians(r), math.radians(r), 7) if r else [0.0] for r in rotation_range_deg]
    extent = half.copy()
    for angles in itertools.product(*steps):
        extent = np.maximum(extent, np.abs(corners @ _rotation_matrix(angles).T).max(axis=0))
    scale = max(1.0, float(max(scaling_range)))
    extent = extent * scale + scale * float(elastic_magnitude) * np.linalg.norm(patch) + 1
    size = np.maximum(np.ceil(2 * extent + 1).astype(int), patch.astype(int))
    size += (size - patch.astype(int)) % 2
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def augmentation_region_size(cfg: Mapping | None, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Region the sampler must read for this augmentation config (the patch itself when spatial is off)."""
    spatial = resolve_augmentation_config(cfg)["spatial"]
    if not spatial["enabled"]:
        return tuple(int(p) for p in patch_size)  # type: ignore[return-value]
    rotation = spatial["rotation_range_deg"] if spatial["rotation_prob"] > 0 else (0, 0, 0)
    scaling = spatial["scaling_range"] if spatial["scaling_prob"] > 0 else (1.0, 1.0)
    elastic = max(spatial["elastic_magnitude"]) if spatial["elastic_prob"] > 0 else 0.0
    return spatial_region_size(patch_size, rotation, scaling, elastic)


def _centre_crop(img: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(C, *region) -> (C, *patch_size), centred as the sampler centres the patch (zeros where short)."""
    region = img.shape[1:]
    start = [(r - p) // 2 for r, p in zip(region, patch_size)]
    if all(s >= 0 for s in start):
        return img[:, start[0]:start[0] + patch_size[0], start[1]:start[1] + patch_size[1],
                   start[2]:start[2] + patch_size[2]]
    out = img.new_zeros((img.shape[0], *patch_size))
    src = tuple(slice(max(s, 0), min(s + p, r)) for s, p, r in zip(start, patch_size, region))
    dst = tuple(slice(max(s, 0) - s, min(s + p, r) - s) for s, p, r in zip(start, patch_size, region))
    out[(slice(None), *dst)] = img[(slice(None), *src)]
    return out


class RandAffinePatchd(RandomizableTransform, MapTransform):
    """Cut the centred patch out of a larger region, rotated, scaled (and optionally elastically
    deformed) in one resampling, as nnU-Net's SpatialTransform does.

    Rotation and scaling have independent probabilities; the scale is one factor for all axes. When
    neither (nor elastic) is drawn the patch is a plain crop. Coordinates outside the region read zero.

    Args:
        keys: keys of (C, *region) tensors sharing one region shape.
        patch_size: (Z, Y, X) output size.
        rotation_prob: probability of a rotation.
        rotation_range_deg: largest |angle| about the z (in-plane), y and x axes, in degrees; e.g.
            (30, 0, 0) for in-plane rotation only on anisotropic data.
        scaling_prob: probability of a scaling.
        scaling_range: factor range; > 1 reads a larger area, so objects get smaller.
        elastic_prob: probability of an elastic deformation (off in nnU-Net).
        elastic_scale: smoothness of the displacement field, as a fraction of the patch (larger: coarser).
        elastic_magnitude: largest displacement, as a fraction of the patch.
        mode: per key, ``"bilinear"`` (trilinear; images) or ``"nearest"`` (labels, values preserved).
    """

    def __init__(self, keys: KeysCollection, patch_size: Sequence[int], rotation_prob: float = 0.0,
                 rotation_range_deg: Sequence[float] = (0.0, 0.0, 0.0), scaling_prob: float = 0.0,
                 scaling_range: Sequence[float] = (1.0, 1.0), elastic_prob: float = 0.0,
                 elastic_scale: Sequence[float] = (0.0, 0.2), elastic_magnitude: Sequence[float] = (0.0, 0.2),
                 mode: Sequence[str] | str = ("bilinear", "nearest"), allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation_prob = float(rotation_prob)
        self.rotation_range = np.radians(np.asarray(rotation_range_deg, dtype=float))
        self.scaling_prob = float(scaling_prob)
        self.scaling_range = tuple(float(s) for s in scaling_range)
        self.elastic_prob = float(elastic_prob)
        self.elastic_scale = tuple(float(s) for s in elastic_scale)
        self.elastic_magnitude = tuple(float(s) for s in elastic_magnitude)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            if m not in ("bilinear", "nearest"):
                raise ValueError(f"mode must be 'bilinear' or 'nearest', got {m!r}")
        if self.rotation_range.shape != (3,):
            raise ValueError(f"rotation_range_deg needs one angle per axis (z, y, x), got {rotation_range_deg}")
        self.matrix: np.ndarray | None = None
        self.displacement: torch.Tensor | None = None

    def randomize(self, data: Any = None) -> None:
        matrix = np.eye(3)
        transformed = False
        if self.R.rand() < self.rotation_prob:
            matrix = _rotation_matrix(self.R.uniform(-self.rotation_range, self.rotation_range))
            transformed = True
        if self.R.rand() < self.scaling_prob:
            matrix = matrix * self.R.uniform(*self.scaling_range)
            transformed = True
        self.matrix = matrix if transformed else None
        self.displacement = None
        if self.R.rand() < self.elastic_prob:
            self.displacement = self._draw_displacement()

    def _draw_displacement(self) -> torch.Tensor:
        """(3, *patch) displacement in voxels: smooth noise, coarse control grid upsampled trilinearly."""
        patch = np.asarray(self.patch_size)
        scale = self.R.uniform(*self.elastic_scale, size=3)
        magnitude = self.R.uniform(*self.elastic_magnitude, size=3) * patch
        points = np.clip(np.round(1.0 / np.maximum(scale, 1e-3)), 2, patch).astype(int)
        coarse = torch.from_numpy(self.R.standard_normal((1, 3, *points)).astype(np.float32))
        field = F.interpolate(coarse, size=self.patch_size, mode="trilinear", align_corners=True)[0]
        peak = field.abs().flatten(1).max(dim=1).values.clamp_min(1e-8)
        return field / peak[:, None, None, None] * torch.as_tensor(magnitude, dtype=torch.float32)[:, None, None, None]

    def _patch_offsets(self) -> list[torch.Tensor]:
        """Per axis (z, y, x), each patch voxel's offset from the patch centre (plus the elastic
        displacement): broadcastable (Pz,1,1) / (1,Py,1) / (1,1,Px) tensors, or full (*patch) ones."""
        offsets = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in self.patch_size]
        grid = [offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]]
        if self.displacement is not None:
            grid = [g + d for g, d in zip(grid, self.displacement)]
        return grid

    def _source_coordinate(self, offsets: list[torch.Tensor], axis: int, region: Sequence[int],
                           scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """``(centre + matrix @ offset)[axis] * scale + shift`` for every patch voxel: (*patch) float32."""
        matrix = self.matrix if self.matrix is not None else np.eye(3)
        centre = (region[axis] - self.patch_size[axis]) // 2 + (self.patch_size[axis] - 1) / 2
        row = [float(m) * scale for m in matrix[axis]]
        # Summing broadcastable terms in this order builds the full array with two passes only.
        return (offsets[0] * row[0] + (centre * scale + shift) + offsets[1] * row[1]) + offsets[2] * row[2]

    def _resample(self, img: torch.Tensor, offsets: list[torch.Tensor], mode: str) -> torch.Tensor:
        """(C, *region) -> (C, *patch) by trilinear interpolation or nearest neighbour; zero outside."""
        region = img.shape[1:]
        if mode == "bilinear":
            # grid_sample wants (x, y, z) in [-1, 1]; align_corners=True maps -1 / 1 to the first / last voxel.
            grid = torch.empty((1, *self.patch_size, 3), dtype=torch.float32)
            for last, axis in enumerate((2, 1, 0)):
                scale = 2.0 / max(region[axis] - 1, 1)
                grid[0, ..., last] = self._source_coordinate(offsets, axis, region, scale, -1.0)
            source = img if img.is_floating_point() else img.float()
            return F.grid_sample(source[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        # Nearest neighbour by gathering: no float copy of the (large) label region, values kept exactly.
        inside = None
        flat = None
        for axis in range(3):
            index = self._source_coordinate(offsets, axis, region, shift=0.5).floor_().to(torch.int32)
            within = (index >= 0) & (index < region[axis])
            inside = within if inside is None else inside.logical_and_(within)
            index.clamp_(0, region[axis] - 1)
            flat = index if flat is None else flat.mul_(region[axis]).add_(index)
        gathered = img.reshape(img.shape[0], -1).index_select(1, flat.reshape(-1))
        return gathered.reshape(img.shape[0], *self.patch_size).masked_fill_(~inside, 0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        offsets = None
        for key, mode in self.key_iterator(d, self.mode):
            img = torch.as_tensor(d[key])
            if self.matrix is None and self.displacement is None:
                d[key] = _centre_crop(img, self.patch_size)
                continue
            if offsets is None:
                offsets = self._patch_offsets()
            d[key] = self._resample(img, offsets, mode)
        return d


# ---- intensity --------------------------------------------------------------------------------------


class RandGaussianNoiseVarianced(RandomizableTransform, MapTransform):
    """Additive zero-mean Gaussian noise, nnU-Net style: variance uniform in ``variance_range`` (std its
    root), one draw shared by all channels. MONAI's RandGaussianNoised draws the std uniformly instead."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, variance_range: Sequence[float] = (0.0, 0.1),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.variance_range = tuple(float(v) for v in variance_range)
        self.std = 0.0
        self.noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.std = math.sqrt(self.R.uniform(*self.variance_range))
            self.noise_seed = int(self.R.randint(MAX_SEED))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        generator = torch.Generator().manual_seed(self.noise_seed)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            d[key] = img + torch.randn(img.shape, generator=generator, dtype=img.dtype) * self.std
        return d


class RandPerChanneld(RandomizableTransform, MapTransform):
    """Apply a random array transform with probability ``prob``, then to each channel separately with
    probability ``prob_per_channel`` (nnU-Net's ``p_per_channel``). ``transform`` should have prob 1."""

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, prob: float = 1.0,
                 prob_per_channel: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = transform
        self.prob_per_channel = float(prob_per_channel)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed=seed, state=state)
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            channels = [torch.as_tensor(self.transform(img[c:c + 1])).as_subclass(torch.Tensor).to(img.dtype)
                        if self.R.rand() < self.prob_per_channel else img[c:c + 1] for c in range(img.shape[0])]
            d[key] = torch.cat(channels)
        return d


# ---- the pipeline -----------------------------------------------------------------------------------


def _factors(value_range: Sequence[float]) -> tuple[float, float]:
    """A multiplier range (0.75, 1.25) as MONAI's ``v * (1 + factor)`` factor range (-0.25, 0.25)."""
    return float(value_range[0]) - 1.0, float(value_range[1]) - 1.0


def build_augmentation(cfg: Mapping | None, patch_size: Sequence[int], image_key: str = "image",
                       label_key: str = "label") -> Compose:
    """The training augmentation as a MONAI Compose.

    Args:
        cfg: an ``augmentation`` config (conf/augmentation/*.yaml; dict or DictConfig); None means
            nnU-Net's defaults. Missing keys take nnU-Net's value.
        patch_size: (Z, Y, X) output size. The input region must be centred on the patch and, when
            spatial augmentation is on, as large as :func:`augmentation_region_size` says.

    Returns a picklable Compose mapping ``{image: (C, *region) float, label: (1, *region) int}`` to
    ``{image: (C, *patch) float32, label: (1, *patch) uint8}`` (other keys pass through). With every
    group disabled it only crops the centred patch. Seed it with ``set_random_state(seed=...)``.
    """
    cfg = resolve_augmentation_config(cfg)
    both = [image_key, label_key]
    spatial = cfg["spatial"]
    on = spatial["enabled"]
    transforms: list = [RandAffinePatchd(
        both, patch_size,
        rotation_prob=spatial["rotation_prob"] if on else 0.0, rotation_range_deg=spatial["rotation_range_deg"],
        scaling_prob=spatial["scaling_prob"] if on else 0.0, scaling_range=spatial["scaling_range"],
        elastic_prob=spatial["elastic_prob"] if on else 0.0, elastic_scale=spatial["elastic_scale"],
        elastic_magnitude=spatial["elastic_magnitude"], mode=("bilinear", "nearest"))]

    noise_blur = cfg["noise_blur"]
    if noise_blur["enabled"]:
        sigma = tuple(noise_blur["blur_sigma"])
        transforms += [
            RandGaussianNoiseVarianced(image_key, prob=noise_blur["noise_prob"],
                                       variance_range=noise_blur["noise_variance"]),
            RandPerChanneld(image_key, RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=1.0),
                            prob=noise_blur["blur_prob"], prob_per_channel=noise_blur["blur_prob_per_channel"]),
        ]
    intensity = cfg["intensity"]
    if intensity["enabled"]:
        transforms += [
            RandScaleIntensityd(image_key, factors=_factors(intensity["brightness_range"]),
                                prob=intensity["brightness_prob"], channel_wise=True),
            RandScaleIntensityFixedMeand(image_key, factors=_factors(intensity["contrast_range"]), fixed_mean=True,
                                         preserve_range=bool(intensity["contrast_preserve_range"]),
                                         prob=intensity["contrast_prob"], channel_wise=True),
        ]
    lowres = cfg["lowres"]
    if lowres["enabled"]:
        transforms.append(RandPerChanneld(
            image_key, RandSimulateLowResolution(prob=1.0, zoom_range=tuple(lowres["zoom_range"]),
                                                 downsample_mode="nearest", upsample_mode="trilinear"),
            prob=lowres["prob"], prob_per_channel=lowres["prob_per_channel"]))
    gamma = cfg["gamma"]
    if gamma["enabled"]:
        transforms += [
            RandAdjustContrastd(image_key, prob=gamma["inverted_prob"], gamma=tuple(gamma["range"]),
                                invert_image=True, retain_stats=bool(gamma["retain_stats"])),
            RandAdjustContrastd(image_key, prob=gamma["prob"], gamma=tuple(gamma["range"]),
                                invert_image=False, retain_stats=bool(gamma["retain_stats"])),
        ]
    mirror = cfg["mirror"]
    if mirror["enabled"]:
        transforms += [RandFlipd(both, prob=mirror["prob"], spatial_axis=int(axis)) for axis in mirror["axes"]]
    transforms.append(EnsureTyped(both, data_type="tensor", dtype=(torch.float32, torch.uint8), track_meta=False))
    return Compose(transforms)
