"""The LightningDataModule: random augmented patches for training, whole cases for validation.

Under DDP (``trainer=ddp``) the semantics are nnU-Net's: ``data.batch_size`` (null: the plan's) is the
global batch, split evenly over the processes, and an epoch stays ``data.iterations_per_epoch`` optimizer
steps. Every process draws its own patches (its own random stream, seeded with its rank) by the same
rules, so each local batch has nnU-Net's share of forced-foreground patches and the subtype-balanced
draw is balanced on every rank. Validation cases are split over the processes by Lightning's
distributed sampler; the module counts each case once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pancreas_mtl.config import plain
from pancreas_mtl.dataset.augmentation import augmentation_region_size, build_augmentation
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.dataset.prepare import PreparedDataset
from pancreas_mtl.dataset.sampling import PatchDataset, PatchSampler, collate_patches
from pancreas_mtl.dataset.settings import augmentation_settings, data_settings, sampling_settings

log = logging.getLogger(__name__)


class WholeCaseDataset(Dataset):
    """Whole preprocessed cases, for sliding-window validation.

    Items: ``image`` (C, Z, Y, X) float32, ``label`` (1, Z, Y, X) uint8, ``subtype`` int (-1 unknown),
    ``case_id`` str, ``split``: the split's name (``val``: the reported validation split, ``inner``: the
    inner validation split the checkpoint is chosen on).
    """

    def __init__(self, cases: list[CachedCase], split: str = "val"):
        self.cases = cases
        self.split = split

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        seg = case.load_seg(mmap=False)
        return {"image": torch.from_numpy(case.load_image(mmap=False)),
                "label": torch.from_numpy(seg.astype(np.uint8)[None]),
                "subtype": -1 if case.subtype is None else int(case.subtype),
                "case_id": case.case_id, "split": self.split}


def collate_cases(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole cases differ in shape: batches of one, with tensors given a batch axis."""
    if len(items) != 1:
        raise ValueError("whole-case batches hold one case")
    item = items[0]
    return {"image": item["image"][None], "label": item["label"][None],
            "subtype": torch.tensor([item["subtype"]]), "case_id": [item["case_id"]],
            "split": item.get("split", "val")}


class PancreasDataModule(L.LightningDataModule):
    """Training patches and validation cases of a prepared dataset.

    Args:
        prepared: the output of :func:`pancreas_mtl.dataset.prepare.prepare_dataset`.
        data_cfg: the ``data`` config (batch_size, iterations_per_epoch, num_workers, sampling, ...).
        augmentation_cfg: the ``augmentation`` config (conf/augmentation/), the run's own: its
            ``extra_transforms`` are built with Hydra's instantiate.
        seed: mixed into the patch sampler's seed.

    ``data.sampling`` and ``augmentation`` are read as changes to conf/data/folder.yaml's ``sampling``
    and conf/augmentation/nnunet.yaml (:mod:`pancreas_mtl.dataset.settings`): keys a config given in
    code leaves out have those files' values.
    """

    def __init__(self, prepared: PreparedDataset, data_cfg: Mapping | DictConfig,
                 augmentation_cfg: Mapping | DictConfig | None, seed: int = 0):
        super().__init__()
        self.prepared = prepared
        self.data = data_settings(data_cfg)
        self.augmentation_cfg = plain(augmentation_cfg)
        self.seed = seed
        self.train_dataset: PatchDataset | None = None
        self.val_dataset: WholeCaseDataset | None = None
        self.inner_dataset: WholeCaseDataset | None = None
        self._sampler: PatchSampler | None = None

    @property
    def plan(self):
        return self.prepared.plan

    @property
    def global_batch_size(self) -> int:
        """Patches per optimizer step over all processes: ``data.batch_size``, or the plan's."""
        return int(self.data.batch_size or self.plan.batch_size)

    @property
    def world_size(self) -> int:
        """Processes training together (1 until a Trainer is attached)."""
        trainer = self.trainer
        return int(trainer.world_size) if trainer is not None else 1

    @property
    def batch_size(self) -> int:
        """Patches per step on this process: the global batch split evenly over the processes."""
        global_batch, world_size = self.global_batch_size, self.world_size
        if global_batch % world_size:
            raise ValueError(
                f"the global batch of {global_batch} patches (data.batch_size, null: the plan's) does not split "
                f"evenly over {world_size} processes (devices x nodes); set data.batch_size to a multiple of "
                f"{world_size}, e.g. {world_size * max(1, round(global_batch / world_size))}")
        return global_batch // world_size

    def subtype_counts(self) -> dict[int, int]:
        """Training cases per subtype (for class weights)."""
        counts: dict[int, int] = {}
        for case in self.prepared.cached(self.prepared.split.train):
            if case.subtype is not None:
                counts[case.subtype] = counts.get(case.subtype, 0) + 1
        return dict(sorted(counts.items()))

    def setup(self, stage: str | None = None) -> None:
        # Built again when the world size is known to differ (train.py sets up before the Trainer exists).
        if self.train_dataset is not None and self.train_dataset.batch_size == self.batch_size:
            return
        patch_size = self.plan.patch_size
        augmentation = augmentation_settings(self.augmentation_cfg)
        if self._sampler is None:
            region_size = augmentation_region_size(augmentation, patch_size)
            self._sampler = PatchSampler(self.prepared.cached(self.prepared.split.train), patch_size, region_size,
                                         **asdict(sampling_settings(self.data.sampling)))
        self.train_dataset = PatchDataset(
            self._sampler, build_augmentation(augmentation, patch_size),
            samples_per_epoch=self.data.iterations_per_epoch * self.batch_size,
            seed=self.seed, batch_size=self.batch_size)
        self.val_dataset = WholeCaseDataset(self.prepared.cached(self.prepared.split.val), "val")
        inner = self.prepared.split.inner
        self.inner_dataset = WholeCaseDataset(self.prepared.cached(inner), "inner") if inner else None

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the patch sampler's random state after the batches trained so far,
        so a run resumed from any checkpoint, mid-epoch too, draws the patches the interrupted run would
        have. Only with ``num_workers=0``; with workers (which draw in their own processes) a resumed run
        draws fresh patches. Under DDP every process's state is gathered (``train_patch_rng_by_rank``):
        Lightning calls this on every rank but only rank 0's dictionary reaches the file."""
        if self.train_dataset is None or self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        state = self.train_dataset.rng_state(batches * self.batch_size)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[dict | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {} if any(s is None for s in states) else {"train_patch_rng_by_rank": states}
        return {} if state is None else {"train_patch_rng": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Each process continues its own stream; a checkpoint of another world size gives fresh draws."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        by_rank = state_dict.get("train_patch_rng_by_rank")
        if by_rank is None and state_dict.get("train_patch_rng") is not None:
            by_rank = [state_dict["train_patch_rng"]]
        if by_rank is None:
            return
        if len(by_rank) != self.world_size:
            log.warning("the checkpoint's patch streams are of %d processes, this run has %d: the patches after "
                        "the resume are fresh draws", len(by_rank), self.world_size)
            return
        self.setup("fit")
        self.train_dataset.restore_rng_state(by_rank[rank])

    def _loader_options(self, workers: int) -> dict[str, Any]:
        options: dict[str, Any] = {"num_workers": workers,
                                   "pin_memory": self.data.pin_memory and torch.cuda.is_available()}
        if workers > 0:
            options["persistent_workers"] = self.data.persistent_workers
            options["prefetch_factor"] = self.data.prefetch_factor
        return options

    def train_dataloader(self) -> DataLoader:
        # No shuffling: items are random already, and their position in the batch decides foreground forcing.
        # Under DDP every rank reads all its own dataset's indices in order: a one-replica DistributedSampler
        # keeps Lightning from interleaving them over the ranks (rank r: r, r + W, ...), which would shorten
        # the epoch and put every item of a rank at the same position in its batch.
        sampler = (DistributedSampler(self.train_dataset, num_replicas=1, rank=0, shuffle=False)
                   if self.world_size > 1 else None)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          drop_last=True, collate_fn=collate_patches, **self._loader_options(self.data.num_workers))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split's cases, then the inner validation split's when there is one (the module
        tells them apart by each batch's ``split``)."""
        datasets = [self.val_dataset] + ([self.inner_dataset] if self.inner_dataset is not None else [])
        loaders = [DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_cases,
                              **self._loader_options(min(1, self.data.num_workers))) for dataset in datasets]
        return loaders[0] if len(loaders) == 1 else loaders
