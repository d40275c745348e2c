"""Train/validation splits: the layout's own (validation folder or splits_final.json) or a seeded k-fold,
and an optional inner validation split carved from the training cases (:func:`carve_inner`), on which a
run chooses its checkpoint so that the validation split it reports was never used to choose anything."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pancreas_mtl.raw.layout import Case, DatasetIndex


@dataclass
class Split:
    """Case ids for training, validation (reported) and inner validation (checkpoint choice; carved from
    the training cases, never trained on; empty when the checkpoint is chosen on ``val``), and where the
    split came from."""

    train: list[str]
    val: list[str]
    source: str
    inner: list[str] = field(default_factory=list)


def _by_subtype(cases: list[Case]) -> dict[int, list[str]]:
    """Case ids per subtype (-1: unknown), each list sorted."""
    by_subtype: dict[int, list[str]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        by_subtype.setdefault(-1 if case.subtype is None else case.subtype, []).append(case.case_id)
    return by_subtype


def stratified_folds(cases: list[Case], num_folds: int, seed: int) -> list[list[str]]:
    """Case ids in ``num_folds`` folds, each subtype spread evenly over the folds, seeded."""
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    by_subtype = _by_subtype(cases)
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


def carve_inner(split: Split, cases: list[Case], size: float, seed: int) -> Split:
    """``split`` with some of its training cases moved to an inner validation split: ``size`` cases, or
    when ``0 < size < 1`` that share of the training cases (rounded); stratified by subtype (each subtype
    gives its share, at least one where it has two or more), chosen by ``seed``. 0 returns ``split`` as
    it is. ValueError when fewer than two training cases would remain.
    """
    if size < 0 or (size >= 1 and size != int(size)):
        raise ValueError(f"data.inner_validation.cases must be 0, a share in (0, 1) or a whole number of cases, "
                         f"got {size}")
    if size <= 0:
        return split
    training = [case for case in cases if case.case_id in set(split.train)]
    num_cases = max(1, round(size * len(training))) if size < 1 else int(size)
    if num_cases > len(training) - 2:
        raise ValueError(f"data.inner_validation.cases={num_cases} leaves {len(training) - num_cases} of "
                         f"{len(training)} training case(s) to train on; lower it (0: choose the checkpoint "
                         "on the validation split)")
    by_subtype = _by_subtype(training)
    shares = {subtype: num_cases * len(ids) / len(training) for subtype, ids in by_subtype.items()}
    counts = {subtype: min(len(by_subtype[subtype]) - 1, max(int(share), 1 if len(by_subtype[subtype]) > 1 else 0))
              for subtype, share in shares.items()}
    # hand the cases left over by rounding down to the subtypes with the largest remainders
    for subtype in sorted(shares, key=lambda k: (shares[k] - int(shares[k]), -k), reverse=True):
        if sum(counts.values()) >= num_cases:
            break
        if counts[subtype] < len(by_subtype[subtype]) - 1:
            counts[subtype] += 1
    rng = np.random.default_rng([seed, 7])
    inner = sorted(ids[i] for subtype, ids in sorted(by_subtype.items())
                   for i in rng.permutation(len(ids))[:counts[subtype]])
    chosen = set(inner)
    return replace(split, train=[case_id for case_id in split.train if case_id not in chosen], inner=inner,
                   source=f"{split.source}, inner validation {len(inner)} case(s) (seed {seed})")
