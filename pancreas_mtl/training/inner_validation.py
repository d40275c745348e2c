"""How many training cases a run holds out as its inner validation split (``data.inner_validation``).

The final model of a run is ``last.ckpt``, so a single run chooses nothing and trains on every labelled
training case. A run that a sweep ranks by a ``select/*`` metric holds ``sweep_cases`` out, so the sweep
picks on cases it does not report: a tune.py trial (:mod:`pancreas_mtl.training.tune`), or a job of
``train.py -m`` whose sweep varies a key other than ``replicate_keys`` (a sweep over folds or seeds only
repeats one configuration). ``data.inner_validation.cases`` set to a number applies to every run.

DDP's ranks 1.. are started by Lightning as single runs of the job's overrides, outside the multirun;
rank 0's answer reaches them through the environment they inherit (``RANKED_ENV``), so every rank
trains on the same cases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from omegaconf import DictConfig, open_dict

from pancreas_mtl.training.loggers import hydra_config, is_multirun, swept_keys

log = logging.getLogger("train")
RANKED_ENV = "PANCREAS_MTL_RANKED_BY"  # set by rank 0: why the run is ranked, "" when it is not


def multirun_ranking(cfg: DictConfig, hydra_cfg: Mapping | None) -> str:
    """Why a run is one a Hydra multirun ranks by ``select/*`` (a sentence), "" when it is not."""
    metric = str(cfg.get("optimized_metric") or "")
    if not is_multirun(hydra_cfg) or not metric.startswith("select/"):
        return ""
    swept = swept_keys(hydra_cfg)
    replicates = {str(key) for key in cfg.data.inner_validation.replicate_keys}
    if swept is not None and swept <= replicates:
        return ""
    varied = ", ".join(sorted(swept - replicates)) if swept is not None else "its overrides"
    return f"a job of a multirun over {varied}, ranked by {metric}"


def ranking_of_this_run(cfg: DictConfig, is_first_process: bool) -> str:
    """:func:`multirun_ranking` for this process; on DDP's later ranks, rank 0's answer where it left one."""
    if not is_first_process and RANKED_ENV in os.environ:
        return os.environ[RANKED_ENV]
    reason = multirun_ranking(cfg, hydra_config())
    if is_first_process:
        os.environ[RANKED_ENV] = reason  # inherited by the ranks Lightning starts; a multirun's next job resets it
    return reason


def trial_ranking(cfg: DictConfig) -> str:
    """Why a tune.py trial is ranked on its inner validation split: its study's ``select/*`` metric."""
    metric = str(cfg.get("optimized_metric") or "")
    return f"a tune.py trial, ranked by {metric}" if metric.startswith("select/") else ""


def resolve_inner_validation(cfg: DictConfig, ranked_by: str) -> None:
    """Write ``data.inner_validation.cases`` as the number this run holds out, where it is null (the
    default): ``sweep_cases`` for a run ranked by a sweep (``ranked_by`` says why), else 0. The resolved
    config, which the checkpoints and the W&B run keep, then says what the run trained on."""
    inner = cfg.data.inner_validation
    if inner.get("cases") is not None:
        return
    cases = inner.sweep_cases if ranked_by else 0
    with open_dict(cfg):
        inner.cases = cases
    if ranked_by:
        log.info("inner validation split: %s of the training cases (data.inner_validation.sweep_cases), as %s",
                 cases, ranked_by)
    else:
        log.info("inner validation split: none, every training case trains (no sweep ranks this run by "
                 "select/*; select/combined is val/combined)")
