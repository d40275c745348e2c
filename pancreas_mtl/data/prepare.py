"""From a dataset folder to a planned, preprocessed, cached dataset: the steps before training.

raw files -> discovery -> fingerprint (checks every case) -> plan -> preprocessing cache -> split.
Each step is reused from disk when its inputs have not changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.data.cache import build_cache, dataset_cache_root
from pancreas_mtl.data.cached_case import CachedCase
from pancreas_mtl.data.layout import DatasetIndex, discover
from pancreas_mtl.data.splits import Split, make_split
from pancreas_mtl.planning.fingerprint import load_or_compute_fingerprint
from pancreas_mtl.planning.plan import Fingerprint, Plan
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


def _plain(config) -> dict:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config or {})


def ensure_synthetic(data_cfg) -> None:
    """Generate the built-in synthetic dataset at ``data.root`` when the config asks for it and it is missing."""
    synthetic = data_cfg.get("synthetic")
    if not synthetic:
        return
    from pancreas_mtl.data.synthetic import generate_dataset, load_config

    config = load_config(synthetic["size"])
    config.seed = int(synthetic.get("seed", config.seed))
    generate_dataset(Path(data_cfg["root"]), config, progress=data_cfg.get("progress", True))


def prepare_dataset(data_cfg, planning_cfg, *, progress: bool = True) -> PreparedDataset:
    """Run (or reuse) every step up to the cache for the dataset and planning configs.

    Args:
        data_cfg: the ``data`` config node (root, cache_dir, split, workers, ...; see conf/data/).
        planning_cfg: the ``planning`` config node (a preset from conf/planning/ plus overrides).
    """
    data_cfg = _plain(data_cfg)
    planning_cfg = _plain(planning_cfg)
    ensure_synthetic(data_cfg)
    index = discover(data_cfg["root"], num_subtypes=int(data_cfg.get("num_subtypes", 3)))
    cache_root = dataset_cache_root(data_cfg["cache_dir"], index)
    cache_root.mkdir(parents=True, exist_ok=True)
    workers = int(data_cfg.get("preprocessing_workers", 0))
    with FileLock(str(cache_root / ".fingerprint.lock")):
        fingerprint = load_or_compute_fingerprint(
            index, cache_root / "fingerprint.json", num_workers=workers,
            samples_per_case=int(data_cfg.get("fingerprint_samples_per_case", 10_000)), progress=progress)
    overrides = planning_cfg.pop("overrides", None) or {}
    plan = plan_experiment(fingerprint, planning_cfg, overrides)
    cached = build_cache(index, plan, cache_root, cases=index.labelled, num_workers=workers, progress=progress)
    split = make_split(index, mode=data_cfg.get("split", "auto"), fold=int(data_cfg.get("fold", 0)),
                       num_folds=int(data_cfg.get("num_folds", 5)), seed=int(data_cfg.get("split_seed", 12345)))
    log.info("dataset %s (%s layout): %d labelled case(s), split %s: %d train / %d validation; cache %s",
             index.name, index.layout, len(index.labelled), split.source, len(split.train), len(split.val),
             cache_root / plan.preprocessing_key())
    return PreparedDataset(index=index, fingerprint=fingerprint, plan=plan, cache_root=cache_root,
                           cases={entry.case_id: entry for entry in cached}, split=split)
