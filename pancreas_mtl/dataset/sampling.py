"""Training patches from the preprocessing cache: nnU-Net's foreground oversampling over memory-mapped cases.

Axis order everywhere is (Z, Y, X). One draw is: a case (uniformly, or subtype-balanced), then a patch
position. With probability ``oversample_foreground`` (nnU-Net: 1/3) the patch is forced to contain a
foreground voxel: a label present in the case is chosen (label 2 first with probability
``lesion_centred_probability``), one of its voxels is drawn from the case's foreground locations and the
patch is centred on it, clipped so it stays within the allowed range. Otherwise the position is uniform.
The three settings are ``data.sampling``'s keys under the same names (values in conf/data/folder.yaml).

A patch may stick out of a volume smaller than the patch: the volume is then centred in the patch and
the rest is zero (image) and background (label), as nnU-Net pads. When spatial augmentation is on,
the sampler reads a larger *region* centred on the patch (see
:func:`pancreas_mtl.dataset.augmentation.augmentation_region_size`), so rotation and scaling have real
context; the spatial transform then returns exactly the patch. Only that region is read from the
memory-mapped arrays.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.planning.plan import LESION_LABEL

UNKNOWN_SUBTYPE = -1


def _as_size(value: Sequence[int], name: str) -> tuple[int, int, int]:
    size = tuple(int(v) for v in value)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"{name} must be three positive sizes (Z, Y, X), got {tuple(value)}")
    return size  # type: ignore[return-value]


def read_region(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Copy ``array[..., start:start + size]`` over the last three axes; parts outside the array are 0.

    Only the overlap with the array is read, so on a memory-mapped array this touches just that slab.
    ``array``: (..., Z, Y, X); returns (..., *size), same dtype.
    """
    spatial = array.shape[-3:]
    # np.zeros of a large region costs little: pages that stay zero are never touched.
    out = np.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    src, dst = [], []
    for axis in range(3):
        lo = max(int(start[axis]), 0)
        hi = min(int(start[axis]) + int(size[axis]), spatial[axis])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[axis]), hi - int(start[axis])))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchSampler:
    """Draws training patches (nnU-Net style) from labelled cached cases.

    Args:
        cases: labelled cases of the preprocessing cache (image (C, Z, Y, X) float32, seg (Z, Y, X) int8).
        patch_size: (Z, Y, X) patch the network sees.
        region_size: (Z, Y, X) region read around (and centred on) the patch, at least ``patch_size``;
            larger when spatial augmentation needs context. Defaults to ``patch_size``.
            ``region_size - patch_size`` is split evenly; an odd remainder goes to the far side.
        oversample_foreground: probability that a patch is forced to contain foreground (nnU-Net: 1/3).
        lesion_centred_probability: probability that a forced patch is centred on a lesion voxel (label 2)
            when the case has one; otherwise the label is drawn uniformly among the labels present.
        subtype_balanced: False: cases uniformly; True: every subtype (unknown subtype counts as one more
            group) equally likely, then a case uniformly within it.

    The last three are ``data.sampling``'s keys (:func:`pancreas_mtl.dataset.settings.sampling_settings`)
    and have no defaults here.
    """

    def __init__(self, cases: Sequence[CachedCase], patch_size: Sequence[int], region_size: Sequence[int] | None = None,
                 *, oversample_foreground: float, lesion_centred_probability: float, subtype_balanced: bool):
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        for name, p in (("oversample_foreground", oversample_foreground),
                        ("lesion_centred_probability", lesion_centred_probability)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability, got {p}")
        self.cases = list(cases)
        self.patch_size = _as_size(patch_size, "patch_size")
        self.region_size = _as_size(region_size if region_size is not None else patch_size, "region_size")
        if any(r < p for r, p in zip(self.region_size, self.patch_size)):
            raise ValueError(f"region_size {self.region_size} must be at least patch_size {self.patch_size}")
        self.region_margin = tuple((r - p) // 2 for r, p in zip(self.region_size, self.patch_size))
        self.oversample_foreground = float(oversample_foreground)
        self.lesion_centred_probability = float(lesion_centred_probability)
        self.subtype_balanced = bool(subtype_balanced)
        for case in self.cases:
            if not case.has_label:
                raise DataError(case.properties_path, "training patches need a label, but the case has none",
                                case_id=case.case_id)
        # Foreground voxels per case and label: small (N, 3) int32 arrays kept in memory.
        self.foreground = [self._load_foreground(case) for case in self.cases]
        subtypes = np.array([UNKNOWN_SUBTYPE if case.subtype is None else int(case.subtype) for case in self.cases])
        self.subtype_groups = {int(s): np.flatnonzero(subtypes == s) for s in np.unique(subtypes)}

    def __len__(self) -> int:
        return len(self.cases)

    @staticmethod
    def _load_foreground(case: CachedCase) -> dict[int, np.ndarray]:
        locations = case.load_foreground_locations()
        if locations.ndim != 2 or locations.shape[1] != 4:
            raise DataError(case.foreground_path, f"expected (N, 4) rows (label, z, y, x), found shape "
                            f"{locations.shape}", case_id=case.case_id)
        coords = locations[:, 1:]
        if len(coords) and ((coords < 0).any() or (coords >= np.asarray(case.shape)).any()):
            raise DataError(case.foreground_path, f"foreground locations outside the volume of shape {case.shape}",
                            case_id=case.case_id)
        return {int(label): np.ascontiguousarray(coords[locations[:, 0] == label], dtype=np.int32)
                for label in np.unique(locations[:, 0]) if label > 0}

    # ---- drawing -------------------------------------------------------------------------------------

    def draw_case(self, rng: np.random.Generator) -> int:
        """Index of a case: uniformly, or subtype-balanced."""
        if not self.subtype_balanced:
            return int(rng.integers(len(self.cases)))
        groups = list(self.subtype_groups.values())
        group = groups[int(rng.integers(len(groups)))]
        return int(group[int(rng.integers(len(group)))])

    def _start_range(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest allowed patch start per axis; a volume smaller than the patch is centred."""
        shape = np.asarray(shape)
        patch = np.asarray(self.patch_size)
        low = np.where(shape >= patch, 0, -((patch - shape) // 2))
        high = np.where(shape >= patch, shape - patch, low)
        return low, high

    def draw_patch_start(self, case_index: int, rng: np.random.Generator,
                         force_foreground: bool) -> tuple[np.ndarray, int | None]:
        """(patch start (3,) in voxels of the case, the label it was centred on or None)."""
        case = self.cases[case_index]
        low, high = self._start_range(case.shape)
        foreground = self.foreground[case_index]
        if force_foreground and foreground:
            labels = sorted(foreground)
            if (LESION_LABEL in foreground and self.lesion_centred_probability > 0
                    and rng.random() < self.lesion_centred_probability):
                label = LESION_LABEL
            else:
                label = labels[int(rng.integers(len(labels)))]
            voxels = foreground[label]
            voxel = voxels[int(rng.integers(len(voxels)))]
            start = np.clip(voxel - np.asarray(self.patch_size) // 2, low, high)
            return start.astype(np.int64), label
        return rng.integers(low, high + 1).astype(np.int64), None

    def read(self, case_index: int, patch_start: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, *region_size) float32, seg (*region_size) int8) around the patch at ``patch_start``."""
        case = self.cases[case_index]
        image = case.load_image(mmap=True)
        seg = case.load_seg(mmap=True)
        if image.shape[1:] != tuple(case.shape) or seg.shape != tuple(case.shape):
            raise DataError(case.folder, f"expected image (C, {case.shape}) and seg {case.shape}, found "
                            f"{image.shape} and {seg.shape}", case_id=case.case_id)
        region_start = np.asarray(patch_start) - np.asarray(self.region_margin)
        return read_region(image, region_start, self.region_size), read_region(seg, region_start, self.region_size)

    def sample(self, rng: np.random.Generator, force_foreground: bool | None = None) -> dict[str, Any]:
        """One region: ``image`` (C, *region) float32 and ``seg`` (*region) int8 numpy arrays, plus
        ``case_id``, ``subtype`` (-1 when unknown), ``patch_start`` (3,) and ``centred_on_label``."""
        if force_foreground is None:
            force_foreground = bool(rng.random() < self.oversample_foreground)
        case_index = self.draw_case(rng)
        start, label = self.draw_patch_start(case_index, rng, force_foreground)
        image, seg = self.read(case_index, start)
        case = self.cases[case_index]
        return {"image": image, "seg": seg, "case_id": case.case_id,
                "subtype": UNKNOWN_SUBTYPE if case.subtype is None else int(case.subtype),
                "patch_start": start, "centred_on_label": label}


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class PatchDataset(Dataset):
    """Map-style dataset of random training patches for a DataLoader: ``samples_per_epoch`` items per epoch.

    Each process (the main one, or each DataLoader worker) draws from its own numpy Generator, created
    on first use from ``torch.initial_seed()`` (per worker and per epoch as torch and Lightning's
    ``seed_everything(workers=True)`` set it), the worker id, the distributed rank and ``seed``; so
    workers differ from each other and a run is reproducible given its seed and worker count. Each item
    also seeds the augmentation's MONAI random state from that Generator.

    Args:
        sampler: where patches come from.
        transform: maps ``{"image": (C, *region) float32 tensor, "label": (1, *region) int8 tensor}`` to
            the same keys at the patch size (see :func:`pancreas_mtl.dataset.augmentation.build_augmentation`);
            None requires ``sampler.region_size == sampler.patch_size``.
        samples_per_epoch: the dataset length, e.g. iterations per epoch times batch size (nnU-Net 250 x 2).
        seed: mixed into every process's seed (None: torch's seed alone decides).
        batch_size: when given, foreground forcing follows nnU-Net's rule for the item's position in its
            batch (items from ``round(batch_size * (1 - oversample_foreground))`` on are forced: one of
            two at batch size 2, one of three at 3) instead of a coin flip; needs a DataLoader that reads
            the indices in order (under DDP each rank reads its own dataset, this batch size being the
            rank's share of the global batch). Where the rule forces none (a batch of one), a coin flip.

    Items: ``image`` (C, Z, Y, X) float32, ``label`` (1, Z, Y, X) uint8, ``subtype`` int (-1 unknown),
    ``case_id`` str, ``has_lesion`` bool (the final patch holds label 2).
    """

    def __init__(self, sampler: PatchSampler, transform: Callable[[dict], dict] | None = None,
                 samples_per_epoch: int = 500, seed: int | None = None, batch_size: int | None = None):
        if transform is None and sampler.region_size != sampler.patch_size:
            raise ValueError(f"without a transform the sampler's region {sampler.region_size} must equal the "
                             f"patch {sampler.patch_size}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.sampler = sampler
        self.transform = transform
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = seed
        self.batch_size = batch_size
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None
        # for resuming: items drawn in this process, and the Generator's state at the last batch starts
        self._items_drawn = 0
        self._batch_start_states: deque[tuple[int, dict]] = deque(maxlen=4)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict:
        # A Generator made in one process must not travel to a worker, or workers would repeat each other.
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_owner"] = None
        return state

    def rng(self) -> np.random.Generator:
        """This process's Generator (created on first use, see the class docstring)."""
        worker = torch.utils.data.get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else -1, torch.initial_seed())
        if self._rng is None or self._rng_owner != owner:
            entropy = [torch.initial_seed(), owner[1] + 1, _distributed_rank()]
            if self.seed is not None:
                entropy.append(int(self.seed) % 2**63)
            self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
            self._rng_owner = owner
        return self._rng

    def rng_state(self, items_consumed: int) -> dict | None:
        """This process's Generator state after its first ``items_consumed`` items, for resuming a run
        where it stopped (:meth:`restore_rng_state`); None when the items were drawn in DataLoader workers
        or that state is no longer known."""
        if self._rng is None or self._rng_owner[1] != -1:
            return None
        if items_consumed == self._items_drawn:
            return {"items": items_consumed, "state": self._rng.bit_generator.state}
        for items, state in self._batch_start_states:  # the loader drew ahead
            if items == items_consumed:
                return {"items": items, "state": state}
        return None

    def restore_rng_state(self, saved: dict) -> None:
        """Continue this process's draws from a state :meth:`rng_state` gave (in the main process, where
        a DataLoader without workers draws)."""
        self.rng().bit_generator.state = saved["state"]
        self._items_drawn = int(saved["items"])
        self._batch_start_states.clear()

    def _force_foreground(self, index: int, rng: np.random.Generator) -> bool:
        p = self.sampler.oversample_foreground
        first_forced = None if self.batch_size is None else round(self.batch_size * (1 - p))
        # a batch too small for the rule to force any patch (one patch per DDP rank) flips a coin instead
        if first_forced is None or (first_forced >= self.batch_size and p > 0):
            return bool(rng.random() < p)
        return index % self.batch_size >= first_forced

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for {self.samples_per_epoch} samples per epoch")
        rng = self.rng()
        if index % (self.batch_size or 1) == 0:
            self._batch_start_states.append((self._items_drawn, rng.bit_generator.state))
        self._items_drawn += 1
        drawn = self.sampler.sample(rng, force_foreground=self._force_foreground(index, rng))
        item = {"image": torch.from_numpy(drawn["image"]), "label": torch.from_numpy(drawn["seg"][None])}
        if self.transform is not None:
            set_random_state = getattr(self.transform, "set_random_state", None)
            if set_random_state is not None:
                set_random_state(seed=int(rng.integers(2**32)))
            item = self.transform(item)
        # MONAI may hand back MetaTensors; the batch only needs plain tensors.
        image = torch.as_tensor(item["image"]).as_subclass(torch.Tensor).to(torch.float32)
        label = torch.as_tensor(item["label"]).as_subclass(torch.Tensor).to(torch.uint8)
        if tuple(image.shape[1:]) != self.sampler.patch_size or tuple(label.shape) != (1, *self.sampler.patch_size):
            raise RuntimeError(f"case {drawn['case_id']}: expected patches of {self.sampler.patch_size}, the transform "
                               f"returned image {tuple(image.shape)} and label {tuple(label.shape)}")
        return {"image": image.contiguous(), "label": label.contiguous(), "subtype": drawn["subtype"],
                "case_id": drawn["case_id"], "has_lesion": bool((label == LESION_LABEL).any())}


def collate_patches(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch PatchDataset items: image (B, C, Z, Y, X) float32, label (B, 1, Z, Y, X) uint8,
    subtype (B,) int64, has_lesion (B,) bool, case_id list of B str."""
    return {"image": torch.stack([item["image"] for item in items]),
            "label": torch.stack([item["label"] for item in items]),
            "subtype": torch.tensor([int(item["subtype"]) for item in items], dtype=torch.int64),
            "has_lesion": torch.tensor([bool(item["has_lesion"]) for item in items], dtype=torch.bool),
            "case_id": [item["case_id"] for item in items]}
