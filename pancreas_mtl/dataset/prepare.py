"""From a dataset folder to a planned, preprocessed, cached dataset: the steps before training.

raw files -> discovery -> fingerprint (checks every case) -> plan -> preprocessing cache -> split.
Each step is reused from disk when its inputs have not changed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from pancreas_mtl.config import plain
from pancreas_mtl.raw.layout import DatasetIndex, discover
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.raw.splits import Split, carve_inner, make_split
from pancreas_mtl.dataset.cache import build_cache, dataset_cache_root
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.dataset.settings import data_settings
from pancreas_mtl.planning.fingerprint import load_or_compute_fingerprint
from pancreas_mtl.planning.plan import Fingerprint, Plan
from pancreas_mtl.planning.adopted import adopt_plan, is_adopted
from pancreas_mtl.planning.planner import plan_experiment

log = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    """Everything a data module needs: the index, fingerprint, plan, cached cases and the split."""

    index: DatasetIndex
    fingerprint: Fingerprint
    plan: Plan
    cache_root: Path
    cases: dict[str, CachedCase]
    split: Split

    def cached(self, case_ids: list[str]) -> list[CachedCase]:
        return [self.cases[case_id] for case_id in case_ids]


SOURCES = ("folder", "synthetic")


def data_source(data_cfg) -> str:
    """``data.source``: ``folder`` (a dataset on disk, read only) or ``synthetic`` (the built-in set).

    conf/data/ sets it in every config; a dict built in Python that leaves it out is synthetic
    when it has a ``synthetic`` node, else a folder.
    """
    source = data_cfg.get("source") or ("synthetic" if data_cfg.get("synthetic") else "folder")
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {list(SOURCES)}, found {source!r}")
    return source


def dataset_root(data_cfg, *, progress: bool = True) -> Path:
    """The dataset folder a run reads, generating the synthetic set first when the source is synthetic.

    ``source=folder``: ``data.root`` must exist; nothing is ever written into it. ``source=synthetic``:
    the set is generated (when missing) only at its place under ``paths.data_dir``
    (``data.synthetic.data_dir``) or into a folder the generator wrote before (its ``synthetic.json``).
    """
    data_cfg = plain(data_cfg)
    root = data_cfg.get("root")
    if data_source(data_cfg) == "folder":
        if root in (None, "", "???"):
            raise ValueError("data.root is not set: data=folder reads the dataset at "
                             "data.root=/path/to/dataset")
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={root}: folder not found. data.source=folder reads a dataset "
                                    "and never creates one (the built-in synthetic set: data=synthetic)")
        if data_cfg.get("synthetic"):
            log.info("data.source=folder: data.synthetic is ignored, nothing is generated")
        return root
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    root = check_synthetic_root(data_cfg)
    settings = data_cfg.get("synthetic") or {}
    if "size" not in settings:
        raise ValueError("data.source=synthetic needs data.synthetic.size (a preset in conf/synthetic/)")
    config = load_config(settings["size"])
    config.seed = int(settings.get("seed", config.seed))
    generate_dataset(root, config, progress=progress)
    return root


def check_synthetic_root(data_cfg) -> Path:
    """``data.root`` for ``source=synthetic``, refused when it is a folder the user named (outside
    ``data.synthetic.data_dir``) that the generator did not write."""
    from pancreas_mtl.synthetic.dataset_folder import MARKER_FILE

    data_cfg = plain(data_cfg)
    root = Path(data_cfg["root"]).expanduser().resolve()
    data_dir = (data_cfg.get("synthetic") or {}).get("data_dir")
    if data_dir is None or (root / MARKER_FILE).is_file():
        return root  # set in Python, or the generator's own folder: the generator's own rules apply
    data_dir = Path(data_dir).expanduser().resolve()
    if root != data_dir and data_dir not in root.parents:
        raise ValueError(
            f"data.source=synthetic with data.root={root}: the synthetic set is generated only under "
            f"paths.data_dir ({data_dir}) or into a folder it was generated into before ({MARKER_FILE}), "
            f"never into a folder named in data.root. To train on the dataset at {root}: "
            f"data=folder data.root={root}")
    return root


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``data.shard`` as (i, n), i in [0, n): ``"2/8"`` is the third of eight shares; None when unset."""
    if shard in (None, ""):
        return None
    text = str(shard)
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"data.shard={text!r}: expected i/n with 0 <= i < n "
                         "(data.shard=0/4 ... data.shard=3/4 split the cases into four)")
    return index, count


def _plan_dataset(data, planning_cfg, progress: bool, source_plan: Plan | None = None,
                  source: str = "") -> tuple[DatasetIndex, Path, Fingerprint, Plan, InputLimits]:
    """Discovery, the fingerprint (computed once, under the cache's lock, by whichever process comes first;
    every other process, shards included, waits and reads it) and the plan, identical for every process:
    planned from the fingerprint, or with ``planning=from_pretrained`` the pretrained network's
    ``source_plan`` adopted (``planning.adopted``)."""
    planning_cfg = plain(planning_cfg)
    index = discover(dataset_root(asdict(data), progress=data.progress), num_subtypes=data.num_subtypes)
    cache_root = dataset_cache_root(data.cache_dir, index)
    cache_root.mkdir(parents=True, exist_ok=True)
    limits = InputLimits.from_config(data.limits)
    with FileLock(str(cache_root / ".fingerprint.lock")):
        fingerprint = load_or_compute_fingerprint(
            index, cache_root / "fingerprint.json", num_workers=data.preprocessing_workers,
            samples_per_case=data.fingerprint_samples_per_case, progress=progress, limits=limits)
    if is_adopted(planning_cfg):
        if source_plan is None and not source:
            raise ValueError("planning=from_pretrained takes the plan of the pretrained network: set pretrained.path "
                             "(pretrained=/path/to/<nnU-Net model folder or checkpoint>)")
        plan = adopt_plan(fingerprint, source_plan, planning_cfg, source)
        return index, cache_root, fingerprint, plan, limits
    overrides = planning_cfg.pop("overrides", None) or {}
    plan = plan_experiment(fingerprint, planning_cfg, overrides)
    return index, cache_root, fingerprint, plan, limits


def prepare_dataset(data_cfg, planning_cfg, *, progress: bool = True, source_plan: Plan | None = None,
                    source: str = "") -> PreparedDataset:
    """Run (or reuse) every step up to the cache for the dataset and planning configs.

    Args:
        data_cfg: the ``data`` config node (root, cache_dir, split, workers, limits, ...), read as changes to
            conf/data/folder.yaml (:func:`~pancreas_mtl.dataset.settings.data_settings`).
        planning_cfg: the ``planning`` config node (a preset from conf/planning/ plus overrides).
        source_plan, source: with ``planning=from_pretrained``, the pretrained network's plan and what it was
            read from (``pretrained.path``).
    """
    data = data_settings(data_cfg)
    if data.shard:
        raise ValueError(f"data.shard={data.shard} preprocesses one share of the cases (prepare_shard); "
                         "a run that needs the whole dataset leaves data.shard unset")
    index, cache_root, fingerprint, plan, limits = _plan_dataset(data, planning_cfg, progress, source_plan, source)
    cached = build_cache(index, plan, cache_root, cases=index.labelled, num_workers=data.preprocessing_workers,
                         progress=progress, limits=limits)
    split = make_split(index, mode=data.split, fold=data.fold, num_folds=data.num_folds, seed=data.split_seed)
    inner = data.inner_validation
    split = carve_inner(split, index.labelled, inner.cases or 0, inner.seed)  # None: a run no sweep ranks
    log.info("dataset %s (%s layout): %d labelled case(s), split %s: %d train / %d inner validation / "
             "%d validation; cache %s",
             index.name, index.layout, len(index.labelled), split.source, len(split.train), len(split.inner),
             len(split.val),
             cache_root / plan.preprocessing_key())
    return PreparedDataset(index=index, fingerprint=fingerprint, plan=plan, cache_root=cache_root,
                           cases={entry.case_id: entry for entry in cached}, split=split)


def prepare_shard(data_cfg, planning_cfg, *, progress: bool = True, source_plan: Plan | None = None,
                  source: str = "") -> list[CachedCase]:
    """Preprocess one share of the labelled cases into the shared cache: ``data.shard=i/n`` takes every n-th
    case from the i-th, in index order. Jobs for 0/n ... (n-1)/n together fill the cache that
    :func:`prepare_dataset` then reuses; they may run at once (the fingerprint is computed once under the
    cache's lock, entries are written atomically and a case belongs to one shard only).

    ``python train.py prepare_only=true data.shard=i/n``; returns this shard's cached cases.
    """
    data = data_settings(data_cfg)
    shard = parse_shard(data.shard)
    if shard is None:
        raise ValueError("prepare_shard needs data.shard=i/n")
    index, cache_root, _, plan, limits = _plan_dataset(data, planning_cfg, progress, source_plan, source)
    cases = index.labelled[shard[0]::shard[1]]
    cached = build_cache(index, plan, cache_root, cases=cases, num_workers=data.preprocessing_workers,
                         progress=progress, limits=limits)
    log.info("dataset %s, shard %d/%d: %d of %d labelled case(s) cached in %s", index.name, *shard, len(cached),
             len(index.labelled), cache_root / plan.preprocessing_key())
    return cached
