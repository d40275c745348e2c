"""Training augmentation: nnU-Net v2's default transforms as a MONAI Compose, every knob a config value.

Input is a dict with ``image`` (C, *region) float32 and ``label`` (1, *region) integer tensors, axes
(Z, Y, X); the region is centred on the patch and at least as large (see :func:`~pancreas_mtl.dataset.spatial_augmentation.spatial_region_size`).
Output is the same keys at exactly ``patch_size``: image float32, label uint8 with values unchanged
(nearest-neighbour resampling, so {0, 1, 2} stay {0, 1, 2}).

Order and defaults follow ``nnUNetTrainer.get_training_transforms`` (nnunetv2 2.x, batchgeneratorsv2):
rotation and scaling in one resampling, Gaussian noise, Gaussian blur, multiplicative brightness,
contrast, low-resolution simulation, inverted gamma, gamma, mirroring. Groups (config keys):
``spatial``, ``noise_blur``, ``intensity`` (brightness, contrast), ``lowres``, ``gamma``, ``mirror``;
each has ``enabled``. MONAI's transforms are used where they exist; three small ones are written here
(the single-resampling spatial transform in :mod:`pancreas_mtl.dataset.spatial_augmentation`, noise with
nnU-Net's variance sampling, and a per-channel probability wrapper).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
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
from monai.utils import MAX_SEED

from pancreas_mtl.dataset.spatial_augmentation import RandAffinePatchd, spatial_region_size

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


def augmentation_region_size(cfg: Mapping | None, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Region the sampler must read for this augmentation config (the patch itself when spatial is off)."""
    spatial = resolve_augmentation_config(cfg)["spatial"]
    if not spatial["enabled"]:
        return tuple(int(p) for p in patch_size)  # type: ignore[return-value]
    rotation = spatial["rotation_range_deg"] if spatial["rotation_prob"] > 0 else (0, 0, 0)
    scaling = spatial["scaling_range"] if spatial["scaling_prob"] > 0 else (1.0, 1.0)
    elastic = max(spatial["elastic_magnitude"]) if spatial["elastic_prob"] > 0 else 0.0
    return spatial_region_size(patch_size, rotation, scaling, elastic)


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
