"""The two-phase recipe as one run: segmentation first, then the multi-task fine-tune from its checkpoint.

Peers on this data who classified best trained the segmentation first and switched the classification on
later (REFERENCE, PANDA): the head then learns from features that already find the lesion. With
``two_phase`` set (``conf/experiment/panda_two_phase.yaml``) one ``train.py`` run does both:

1. **segmentation** in ``<run folder>/segmentation/``: this run's config with ``two_phase.segmentation``'s
   values over it (a nested mapping of run-config keys, e.g. ``loss: {cls_weight: 0.0}`` and its own
   ``trainer: {max_epochs: ...}``; each must exist in the run config); a
   ``pretrained`` source of the run warm starts this phase;
2. **multi-task** in the run folder: this run's config, warm started from phase 1's ``last.ckpt`` with
   ``pretrained.parts`` = ``two_phase.parts`` (``backbone``: the whole segmentation network, not the
   head), ``pretrained.lr_scale`` and ``pretrained.freeze_epochs`` as this run sets them.

Each phase resumes on its own (``ckpt_path=auto``): a killed or requeued run finishes phase 1 if it was
cut there, skips it if its last.ckpt reached the end, then resumes or starts phase 2. The metric returned
is phase 2's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

SEGMENTATION_DIR = "segmentation"


_ABSENT = object()


def _leaves(values: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every non-mapping value of a nested mapping."""
    leaves = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def phase_configs(cfg: DictConfig) -> tuple[DictConfig, DictConfig]:
    """(phase 1's config, phase 2's config) of a two-phase run (see the module docstring)."""
    recipe = cfg.two_phase
    if cfg.get("ckpt_path") not in ("auto", None):
        raise ValueError(f"two_phase: ckpt_path={cfg.ckpt_path} cannot say which phase it resumes; each phase "
                         "resumes from its own folder with ckpt_path=auto")
    if cfg.get("prepare_only") or cfg.data.get("shard"):
        raise ValueError("two_phase trains two runs; prepare_only and data.shard prepare the dataset only: "
                         "leave two_phase null for them (two_phase=null)")
    values = recipe.get("segmentation") or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"two_phase.segmentation: expected a mapping of run-config values, found {values!r}")
    run_dir = Path(cfg.paths.output_dir)
    first = copy.deepcopy(cfg)
    with open_dict(first):
        first.two_phase = None
        first.paths.output_dir = str(run_dir / SEGMENTATION_DIR)
        for key, value in _leaves(OmegaConf.to_container(values)):
            if OmegaConf.select(first, key, default=_ABSENT) is _ABSENT:
                raise ValueError(f"two_phase.segmentation.{key}: the run config has no {key}")
            OmegaConf.update(first, key, value, merge=False)
    second = copy.deepcopy(cfg)
    with open_dict(second):
        second.two_phase = None
        second.paths.output_dir = str(run_dir)
        second.pretrained.path = str(run_dir / SEGMENTATION_DIR / "checkpoints" / "last.ckpt")
        second.pretrained.parts = str(recipe.parts)
    return first, second


def run_two_phase(cfg: DictConfig, train: Callable[..., float | None], extra_callbacks: Sequence = ()) -> float | None:
    """Phase 1, then phase 2 (with ``extra_callbacks``, e.g. tune.py's pruning); phase 2's metric."""
    first, second = phase_configs(cfg)
    log.info("two_phase: phase 1 (segmentation) in %s", first.paths.output_dir)
    train(first)
    if not Path(second.pretrained.path).is_file():
        raise FileNotFoundError(f"two_phase: phase 1 ended without {second.pretrained.path}; "
                                "its checkpoint callback (callbacks.last_checkpoint) must be on")
    log.info("two_phase: phase 2 (multi-task) in %s, from %s", second.paths.output_dir, second.pretrained.path)
    return train(second, extra_callbacks)
