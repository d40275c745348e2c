"""Train/validation splits: the layout's own (validation folder or splits_final.json) or a seeded k-fold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pancreas_mtl.data.layout import Case, DatasetIndex


@dataclass
class Split:
    """Case ids for training and validation, and where the split came from."""

    train: list[str]
    val: list[str]
    source: str


def stratified_folds(cases: list[Case], num_folds: int, seed: int) -> list[list[str]]:
    """Case ids in ``num_folds`` folds, each subtype spread evenly over the folds, seeded."""
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    by_subtype: dict[int, list[str]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        by_subtype.setdefault(-1 if case.subtype is None else case.subtype, []).append(case.case_id)
    offset = 0
    for subtype in sorted(by_subtype):
        ids = by_subtype[subtype]
        for position, i in enumerate(rng.permutation(len(ids))):
            folds[(position + offset) % num_folds].append(ids[i])
        offset += len(ids)  # the next subtype starts filling where this one stopped
    return [sorted(fold) for fold in folds]


def make_split(index: DatasetIndex, mode: str = "auto", fold: int = 0, num_folds: int = 5, seed: int = 12345) -> Split:
    """The split to train on.

    Args:
        mode: ``folder`` uses the layout's split (the distributed layout's validation folder, or
            fold ``fold`` of an nnU-Net splits_final.json); ``kfold`` makes a seeded, subtype-stratified
            ``num_folds``-fold split of all labelled cases and takes fold ``fold`` as validation;
            ``auto`` is ``folder`` when the layout has a split, else ``kfold``.
    """
    labelled = index.labelled
    has_folder_split = bool(index.split("validation")) or bool(index.splits)
    if mode == "auto":
        mode = "folder" if has_folder_split else "kfold"
    if mode == "folder":
        if index.splits:
            if not 0 <= fold < len(index.splits):
                raise ValueError(f"{index.root}: fold {fold} requested, splits_final.json has {len(index.splits)} fold(s)")
            chosen = index.splits[fold]
            return Split(sorted(chosen["train"]), sorted(chosen["val"]), f"splits_final.json fold {fold}")
        if not index.split("validation"):
            raise ValueError(f"{index.root}: split mode 'folder' needs a validation folder or splits_final.json")
        return Split(sorted(c.case_id for c in index.split("train")),
                     sorted(c.case_id for c in index.split("validation")), "validation folder")
    if mode == "kfold":
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
        if len(labelled) < num_folds:
            raise ValueError(f"{index.root}: {len(labelled)} labelled case(s) cannot make {num_folds} folds")
        folds = stratified_folds(labelled, num_folds, seed)
        train = sorted(cid for i, f in enumerate(folds) if i != fold for cid in f)
        return Split(train, folds[fold], f"{num_folds}-fold (seed {seed}) fold {fold}")
    raise ValueError(f"unknown split mode {mode!r}: expected auto, folder or kfold")
