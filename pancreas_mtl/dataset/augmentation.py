"""Training augmentation: nnU-Net v2's default transforms as a MONAI Compose, every knob a config value.

Input is a dict with ``image`` (C, *region) float32 and ``label`` (1, *region) integer tensors, axes
(Z, Y, X); the region is centred on the patch and at least as large (see
:func:`~pancreas_mtl.dataset.spatial_augmentation.spatial_region_size`). Output is the same keys at
exactly ``patch_size``: image float32, label uint8 with values unchanged (nearest-neighbour resampling,
so {0, 1, 2} stay {0, 1, 2}).

Order and values follow ``nnUNetTrainer.get_training_transforms`` (nnunetv2 2.x, batchgeneratorsv2):
rotation and scaling in one resampling, Gaussian noise, Gaussian blur, multiplicative brightness,
contrast, low-resolution simulation, inverted gamma, gamma, mirroring. Groups (config keys):
``spatial``, ``noise_blur``, ``intensity`` (brightness, contrast), ``lowres``, ``gamma``, ``mirror``;
each has ``enabled``; ``extra_transforms`` appends any MONAI transform by ``_target_``. The values live
in conf/augmentation/nnunet.yaml (:mod:`pancreas_mtl.dataset.settings`). MONAI's transforms are used
where they exist; three are written here in MONAI's style, an array transform plus a dictionary
version: the single-resampling spatial transform (:mod:`pancreas_mtl.dataset.spatial_augmentation`),
noise with nnU-Net's variance sampling, and a per-channel probability wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

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
from monai.utils import MAX_SEED, TransformBackends

from pancreas_mtl.dataset.settings import AugmentationSettings, augmentation_settings
from pancreas_mtl.dataset.spatial_augmentation import RandSpatialNNUNetd, spatial_region_size


def augmentation_region_size(cfg: AugmentationSettings | Mapping | None,
                             patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Region the sampler must read for this augmentation config (the patch itself when spatial is off)."""
    spatial = augmentation_settings(cfg).spatial
    if not spatial.enabled:
        return tuple(int(p) for p in patch_size)  # type: ignore[return-value]
    rotation = spatial.rotation_range_deg if spatial.rotation_prob > 0 else (0, 0, 0)
    scaling = spatial.scaling_range if spatial.scaling_prob > 0 else (1.0, 1.0)
    elastic = max(spatial.elastic_magnitude) if spatial.elastic_prob > 0 else 0.0
    return spatial_region_size(patch_size, rotation, scaling, elastic)


# ---- intensity --------------------------------------------------------------------------------------


class RandGaussianNoiseVariance(RandomizableTransform):
    """Additive zero-mean Gaussian noise, nnU-Net style: variance uniform in ``variance_range`` (std its
    root), one draw shared by all channels. MONAI's RandGaussianNoise draws the std uniformly instead.

    Args:
        prob: probability of adding noise.
        variance_range: (low, high) of the noise variance.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, prob: float = 0.1, variance_range: Sequence[float] = (0.0, 0.1)):
        RandomizableTransform.__init__(self, prob)
        self.variance_range = tuple(float(v) for v in variance_range)
        self.std = 0.0
        self.noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.std = math.sqrt(self.R.uniform(*self.variance_range))
            self.noise_seed = int(self.R.randint(MAX_SEED))

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        """``img``: (C, *spatial); ``randomize=False`` adds the last draw's noise again."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        img = torch.as_tensor(img)
        generator = torch.Generator().manual_seed(self.noise_seed)
        return img + torch.randn(img.shape, generator=generator, dtype=img.dtype) * self.std


class RandGaussianNoiseVarianced(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandGaussianNoiseVariance`: one draw for every key."""

    backend = RandGaussianNoiseVariance.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.1, variance_range: Sequence[float] = (0.0, 0.1),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.noise = RandGaussianNoiseVariance(prob=1.0, variance_range=variance_range)

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandGaussianNoiseVarianced:
        super().set_random_state(seed, state)
        self.noise.set_random_state(state=self.R)  # one generator, as in RandSpatialNNUNetd
        return self

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.noise.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.noise(d[key], randomize=False)
        return d


class RandPerChannel(RandomizableTransform):
    """Apply a random array transform with probability ``prob``, then to each channel separately with
    probability ``prob_per_channel`` (nnU-Net's ``p_per_channel``).

    Args:
        transform: a random array transform on (1, *spatial), with prob 1 (this class decides whether).
        prob: probability of transforming at all.
        prob_per_channel: probability for each channel, once transforming.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, transform: RandomizableTransform, prob: float = 1.0, prob_per_channel: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        self.transform = transform
        self.prob_per_channel = float(prob_per_channel)
        self.channels: list[bool] = []

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandPerChannel:
        super().set_random_state(seed, state)
        self.transform.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any) -> None:
        """``data``: the (C, *spatial) image, for its number of channels."""
        super().randomize(None)
        self.channels = [bool(self.R.rand() < self.prob_per_channel) for _ in range(len(data))] \
            if self._do_transform else []

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize(img)
        if not self._do_transform or not any(self.channels):
            return img
        img = torch.as_tensor(img)
        return torch.cat([torch.as_tensor(self.transform(img[c:c + 1])).as_subclass(torch.Tensor).to(img.dtype)
                          if chosen else img[c:c + 1] for c, chosen in enumerate(self.channels)])


class RandPerChanneld(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandPerChannel`: one draw of ``prob``; channels drawn per key."""

    backend = RandPerChannel.backend

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, prob: float = 1.0,
                 prob_per_channel: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.per_channel = RandPerChannel(transform, prob=1.0, prob_per_channel=prob_per_channel)

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandPerChanneld:
        super().set_random_state(seed, state)
        self.per_channel.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.per_channel(d[key])
        return d


# ---- the pipeline -----------------------------------------------------------------------------------


def _factors(value_range: Sequence[float]) -> tuple[float, float]:
    """A multiplier range (0.75, 1.25) as MONAI's ``v * (1 + factor)`` factor range (-0.25, 0.25)."""
    return float(value_range[0]) - 1.0, float(value_range[1]) - 1.0


def extra_transforms(entries: Mapping[str, Any]) -> list[Callable]:
    """The ``augmentation.extra_transforms`` entries (name -> node with ``_target_``; null skipped), built
    with ``hydra.utils.instantiate`` in the order listed.

    Only for the run's own config: instantiate imports and calls whatever ``_target_`` names, so a
    config read back from a file (a checkpoint's) must never come here.
    """
    from hydra.utils import instantiate

    built = []
    for name, spec in entries.items():
        if spec is None:
            continue
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ValueError(f"augmentation.extra_transforms.{name}: expected a node with _target_ (e.g. {{_target_: "
                             f"monai.transforms.RandGaussianSharpend, keys: [image]}}), found {spec!r}")
        transform = instantiate(spec, _convert_="all")
        if not callable(transform):
            raise TypeError(f"augmentation.extra_transforms.{name}: {spec['_target_']} built a "
                            f"{type(transform).__name__}, not a transform")
        built.append(transform)
    return built


def build_augmentation(cfg: AugmentationSettings | Mapping | None, patch_size: Sequence[int],
                       image_key: str = "image", label_key: str = "label") -> Compose:
    """The training augmentation as a MONAI Compose.

    Args:
        cfg: an ``augmentation`` config (conf/augmentation/*.yaml, a dict, or checked settings); read as
            changes to conf/augmentation/nnunet.yaml (None: that file as it is), see
            :func:`~pancreas_mtl.dataset.settings.augmentation_settings`.
        patch_size: (Z, Y, X) output size. The input region must be centred on the patch and, when
            spatial augmentation is on, as large as :func:`augmentation_region_size` says.

    Returns a picklable Compose mapping ``{image: (C, *region) float, label: (1, *region) int}`` to
    ``{image: (C, *patch) float32, label: (1, *patch) uint8}`` (other keys pass through): our steps, then
    ``extra_transforms``, then a cast. With every group disabled and no extra transform it only crops
    the centred patch. Seed it with ``set_random_state(seed=...)``; that seeds every random step.
    """
    cfg = augmentation_settings(cfg)
    both = [image_key, label_key]
    spatial = cfg.spatial
    on = spatial.enabled
    transforms: list = [RandSpatialNNUNetd(
        both, patch_size,
        rotation_prob=spatial.rotation_prob if on else 0.0, rotation_range_deg=spatial.rotation_range_deg,
        scaling_prob=spatial.scaling_prob if on else 0.0, scaling_range=spatial.scaling_range,
        elastic_prob=spatial.elastic_prob if on else 0.0, elastic_scale=spatial.elastic_scale,
        elastic_magnitude=spatial.elastic_magnitude, mode=("bilinear", "nearest"))]

    noise_blur = cfg.noise_blur
    if noise_blur.enabled:
        sigma = tuple(noise_blur.blur_sigma)
        transforms += [
            RandGaussianNoiseVarianced(image_key, prob=noise_blur.noise_prob,
                                       variance_range=noise_blur.noise_variance),
            RandPerChanneld(image_key, RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=1.0),
                            prob=noise_blur.blur_prob, prob_per_channel=noise_blur.blur_prob_per_channel),
        ]
    intensity = cfg.intensity
    if intensity.enabled:
        transforms += [
            RandScaleIntensityd(image_key, factors=_factors(intensity.brightness_range),
                                prob=intensity.brightness_prob, channel_wise=True),
            RandScaleIntensityFixedMeand(image_key, factors=_factors(intensity.contrast_range), fixed_mean=True,
                                         preserve_range=intensity.contrast_preserve_range,
                                         prob=intensity.contrast_prob, channel_wise=True),
        ]
    lowres = cfg.lowres
    if lowres.enabled:
        transforms.append(RandPerChanneld(
            image_key, RandSimulateLowResolution(prob=1.0, zoom_range=tuple(lowres.zoom_range),
                                                 downsample_mode="nearest", upsample_mode="trilinear"),
            prob=lowres.prob, prob_per_channel=lowres.prob_per_channel))
    gamma = cfg.gamma
    if gamma.enabled:
        transforms += [
            RandAdjustContrastd(image_key, prob=gamma.inverted_prob, gamma=tuple(gamma.range),
                                invert_image=True, retain_stats=gamma.retain_stats),
            RandAdjustContrastd(image_key, prob=gamma.prob, gamma=tuple(gamma.range),
                                invert_image=False, retain_stats=gamma.retain_stats),
        ]
    mirror = cfg.mirror
    if mirror.enabled:
        transforms += [RandFlipd(both, prob=mirror.prob, spatial_axis=int(axis)) for axis in mirror.axes]
    transforms += extra_transforms(cfg.extra_transforms)
    transforms.append(EnsureTyped(both, data_type="tensor", dtype=(torch.float32, torch.uint8), track_meta=False))
    return Compose(transforms)
