"""nnU-Net's spatial augmentation for patches: rotation, scaling and elastic deformation in one resampling.

The sampler reads a region larger than the patch (:func:`spatial_region_size`), centred on it, so that
rotated and scaled patches hold real voxels; :class:`RandSpatialNNUNet` (array) and
:class:`RandSpatialNNUNetd` (dictionary, one draw for image and label) resample that region to the patch
once, image linearly and label by nearest neighbour. Axes are (Z, Y, X). Resampling only the patch's
voxels is about 3x to 4x faster than MONAI's ``RandAffined`` on the same region (2.8x at 32 x 64 x 96,
3.7x at 64 x 128 x 192, one thread on the project's CPU). Built into the training pipeline by
:func:`pancreas_mtl.dataset.augmentation.build_augmentation`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, ensure_tuple_rep


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


class RandSpatialNNUNet(RandomizableTransform):
    """Cut the centred patch out of a larger region, rotated, scaled (and optionally elastically
    deformed) in one resampling, as nnU-Net's SpatialTransform does.

    Rotation and scaling have independent probabilities; the scale is one factor for all axes. When
    neither (nor elastic) is drawn the patch is a plain crop. Coordinates outside the region read zero.
    Input (C, *region), region centred on the patch and at least :func:`spatial_region_size`; output
    (C, *patch_size), float for ``"bilinear"``, the input's dtype for ``"nearest"``.

    Args:
        patch_size: (Z, Y, X) output size.
        rotation_prob: probability of a rotation.
        rotation_range_deg: largest |angle| about the z (in-plane), y and x axes, in degrees; e.g.
            (30, 0, 0) for in-plane rotation only on anisotropic data.
        scaling_prob: probability of a scaling.
        scaling_range: factor range; > 1 reads a larger area, so objects get smaller.
        elastic_prob: probability of an elastic deformation (off in nnU-Net).
        elastic_scale: smoothness of the displacement field, as a fraction of the patch (larger: coarser).
        elastic_magnitude: largest displacement, as a fraction of the patch.
        mode: ``"bilinear"`` (trilinear; images) or ``"nearest"`` (labels, values preserved).
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, patch_size: Sequence[int], rotation_prob: float = 0.0,
                 rotation_range_deg: Sequence[float] = (0.0, 0.0, 0.0), scaling_prob: float = 0.0,
                 scaling_range: Sequence[float] = (1.0, 1.0), elastic_prob: float = 0.0,
                 elastic_scale: Sequence[float] = (0.0, 0.2), elastic_magnitude: Sequence[float] = (0.0, 0.2),
                 mode: str = "bilinear"):
        RandomizableTransform.__init__(self, prob=1.0)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation_prob = float(rotation_prob)
        self.rotation_range = np.radians(np.asarray(rotation_range_deg, dtype=float))
        self.scaling_prob = float(scaling_prob)
        self.scaling_range = tuple(float(s) for s in scaling_range)
        self.elastic_prob = float(elastic_prob)
        self.elastic_scale = tuple(float(s) for s in elastic_scale)
        self.elastic_magnitude = tuple(float(s) for s in elastic_magnitude)
        self.mode = _check_mode(mode)
        if self.rotation_range.shape != (3,):
            raise ValueError(f"rotation_range_deg needs one angle per axis (z, y, x), got {rotation_range_deg}")
        self.matrix: np.ndarray | None = None
        self.displacement: torch.Tensor | None = None
        self._offsets: list[torch.Tensor] | None = None

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
        self._offsets = None

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
        displacement): broadcastable (Pz,1,1) / (1,Py,1) / (1,1,Px) tensors, or full (*patch) ones.
        Computed once per draw, shared by every array resampled with it."""
        if self._offsets is None:
            offsets = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in self.patch_size]
            grid = [offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]]
            if self.displacement is not None:
                grid = [g + d for g, d in zip(grid, self.displacement)]
            self._offsets = grid
        return self._offsets

    def _source_coordinate(self, offsets: list[torch.Tensor], axis: int, region: Sequence[int],
                           scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """``(centre + matrix @ offset)[axis] * scale + shift`` for every patch voxel: (*patch) float32."""
        matrix = self.matrix if self.matrix is not None else np.eye(3)
        centre = (region[axis] - self.patch_size[axis]) // 2 + (self.patch_size[axis] - 1) / 2
        row = [float(m) * scale for m in matrix[axis]]
        # Summing broadcastable terms in this order builds the full array with two passes only.
        return (offsets[0] * row[0] + (centre * scale + shift) + offsets[1] * row[1]) + offsets[2] * row[2]

    def _resample(self, img: torch.Tensor, mode: str) -> torch.Tensor:
        """(C, *region) -> (C, *patch) by trilinear interpolation or nearest neighbour; zero outside."""
        region = img.shape[1:]
        offsets = self._patch_offsets()
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

    def __call__(self, img: Any, mode: str | None = None, randomize: bool = True) -> torch.Tensor:
        """``img``: (C, *region) array or tensor; ``mode`` overrides the constructor's for this call;
        ``randomize=False`` reuses the last draw (to move a label exactly as its image)."""
        if randomize:
            self.randomize()
        img = torch.as_tensor(img)
        if self.matrix is None and self.displacement is None:
            return _centre_crop(img, self.patch_size)
        return self._resample(img, self.mode if mode is None else _check_mode(mode))


class RandSpatialNNUNetd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandSpatialNNUNet`: one draw moves every key alike.

    Args:
        keys: keys of (C, *region) tensors sharing one region shape.
        patch_size, rotation_prob, rotation_range_deg, scaling_prob, scaling_range, elastic_prob,
            elastic_scale, elastic_magnitude: as for :class:`RandSpatialNNUNet`.
        mode: per key, ``"bilinear"`` (images) or ``"nearest"`` (labels); one value for all keys or a sequence.
        allow_missing_keys: don't raise an error if a key is missing.
    """

    backend = RandSpatialNNUNet.backend

    def __init__(self, keys: KeysCollection, patch_size: Sequence[int], rotation_prob: float = 0.0,
                 rotation_range_deg: Sequence[float] = (0.0, 0.0, 0.0), scaling_prob: float = 0.0,
                 scaling_range: Sequence[float] = (1.0, 1.0), elastic_prob: float = 0.0,
                 elastic_scale: Sequence[float] = (0.0, 0.2), elastic_magnitude: Sequence[float] = (0.0, 0.2),
                 mode: Sequence[str] | str = ("bilinear", "nearest"), allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.mode = tuple(_check_mode(m) for m in ensure_tuple_rep(mode, len(self.keys)))
        self.spatial = RandSpatialNNUNet(patch_size, rotation_prob, rotation_range_deg, scaling_prob, scaling_range,
                                         elastic_prob, elastic_scale, elastic_magnitude)

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandSpatialNNUNetd:
        super().set_random_state(seed, state)
        # One generator for both: the pipeline is reseeded for every patch, and making a second
        # RandomState costs about 0.1 ms, as much as cutting a small patch.
        self.spatial.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.spatial.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.spatial(d[key], mode=mode, randomize=False)
        return d


def _check_mode(mode: str) -> str:
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return mode
