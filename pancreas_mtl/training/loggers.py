"""Experiment loggers from the ``logger`` config group (the images and tables sent to them during
validation: pancreas_mtl.training.validation_media).

``build_loggers(cfg.logger, output_dir, config)`` instantiates every logger of the group; a W&B logger
goes offline by itself when no credentials are found (``wandb.init`` fails at once without an API key,
offline mode needs no network; ``wandb sync`` uploads the run later), and takes its group and name from
the Hydra sweep it runs in (:func:`wandb_run_identity`). Nothing here may stop a training run: a W&B
run that cannot start (``wandb.init`` fails) leaves the other loggers with a warning, and a run id that
is not a W&B id starts a new run.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from pancreas_mtl.tracking.settings import resolve_wandb_offline, valid_run_id

log = logging.getLogger(__name__)

# --- loggers ----------------------------------------------------------------------------------------

def swept_keys(hydra_cfg: Mapping) -> set[str] | None:
    """Keys a multirun varies: the sweep overrides of its command line (``<sweep dir>/multirun.yaml``,
    which Hydra's basic sweeper writes) and a search sweeper's ``params``; None when neither is found."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys: set[str] = set()
    found = False
    master = Path(str(hydra_cfg["sweep"]["dir"])) / "multirun.yaml"
    if master.is_file():
        found = True
        task = OmegaConf.load(master).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(task))
        keys |= {override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()}
    params = (hydra_cfg.get("sweeper") or {}).get("params")
    if params:
        found = True
        keys |= set(params)
    return keys if found else None


def is_multirun(hydra_cfg: Mapping | None) -> bool:
    """Whether a Hydra config (``HydraConfig.get()``; None outside Hydra) is a job of a multirun."""
    return hydra_cfg is not None and str(hydra_cfg.get("mode")).rsplit(".", 1)[-1] == "MULTIRUN"  # RunMode.MULTIRUN


def wandb_run_identity(hydra_cfg: Mapping | None, task_name: str) -> dict[str, str | None]:
    """The W&B ``name`` and ``group`` of a run from its Hydra config (``HydraConfig.get()``; None outside Hydra).

    In a multirun (a grid, a fold set, a search sweeper's trials) every job shares the group
    ``{task_name}_{sweep folder name}`` and is named from the overrides that vary between the jobs
    (``data.fold=1,seed=2``; all of the job's overrides when the swept keys cannot be found). A single
    run is named ``task_name`` and has no group.
    """
    if not is_multirun(hydra_cfg):
        return {"name": task_name, "group": None}
    group = f"{task_name}_{Path(str(hydra_cfg['sweep']['dir'])).name}"
    overrides = list(hydra_cfg["overrides"]["task"])
    swept = swept_keys(hydra_cfg)
    if swept is not None:
        overrides = [override for override in overrides if override.split("=", 1)[0].lstrip("+~") in swept]
    separators = hydra_cfg["job"]["config"]["override_dirname"]
    kv_sep, item_sep = str(separators["kv_sep"]), str(separators["item_sep"])
    name = item_sep.join(override.replace("=", kv_sep, 1) for override in sorted(overrides))
    return {"name": name or f"{task_name}_{hydra_cfg['job']['num']}", "group": group}


def hydra_config() -> Mapping | None:
    """This process's Hydra config (``HydraConfig.get()``), None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _target(entry: Mapping) -> str:
    return str(entry.get("_target_") or "")


def _require_tensorboard(name: str) -> None:
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ModuleNotFoundError(
            f"logger {name!r} (TensorBoardLogger) needs the tensorboard package, which is not installed: "
            "run `pip install tensorboard` in this environment, or choose logger=csv or logger=wandb")


def _start_wandb_run(logger, name: str, entry: Mapping) -> str | None:
    """Start the W&B run now (``wandb.init`` on rank 0; Lightning's placeholder on the others) rather than
    inside ``fit``, so that a failure drops this logger instead of stopping training; what failed, or None."""
    try:
        logger.experiment  # noqa: B018 - the property calls wandb.init
    except Exception as error:  # noqa: BLE001 - wandb raises many types (UsageError, CommError, timeouts)
        setting = f" (logger.{name}.id={entry.get('id')!r})" if entry.get("id") is not None else ""
        return f"W&B: logger {name!r} could not start its run{setting}: {type(error).__name__}: {error}"
    return None


def build_loggers(logger_cfg: Mapping | None, output_dir: str | Path, config: Mapping | None = None,
                  resumed_run: Mapping | None = None) -> list:
    """Every logger of the ``logger`` config group, with the resolved run config logged to each.

    Args:
        logger_cfg: ``{name: {_target_: ..., ...}}`` (conf/logger/*.yaml); entries without a ``_target_``
            are skipped, so ``logger=null`` or an empty group gives no logger.
        output_dir: the run folder; loggers without a ``save_dir`` write there.
        config: the resolved run config (plain containers), stored as the run's hyperparameters (the
            W&B run config, CSV hparams.yaml, TensorBoard hparams).
        resumed_run: the W&B reference of the checkpoint training resumes from (``checkpoint["wandb"]``):
            a W&B entry without an ``id`` of its own continues that run (``resume="allow"``) instead of
            starting another; an id that is not a W&B run id starts a new run, with a warning.

    A W&B entry's ``offline: auto`` is decided by :func:`resolve_wandb_offline`; its ``name`` and ``group``,
    when null, come from :func:`wandb_run_identity` (the Hydra sweep the run is part of). Its run starts
    here; when ``wandb.init`` fails the logger is left out with a warning and the others log the run.
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if logger_cfg is None:
        return []
    if not isinstance(logger_cfg, DictConfig):
        logger_cfg = OmegaConf.create(dict(logger_cfg))
    loggers = []
    failures = []
    for name, entry in logger_cfg.items():
        if not isinstance(entry, DictConfig) or not _target(entry):
            continue
        target = _target(entry)
        overrides: dict[str, Any] = {}
        if entry.get("save_dir") is None:
            overrides["save_dir"] = str(output_dir)
        wandb_config: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            overrides["offline"] = resolve_wandb_offline(entry.get("offline", "auto"))
            # checkpoints go to W&B through monitoring.WandbArtifacts, offline too (Lightning's log_model
            # refuses offline runs and sees ModelCheckpoint files only, not last.ckpt)
            overrides["log_model"] = False
            identity = wandb_run_identity(hydra_config(), str((config or {}).get("task_name") or "train"))
            overrides.update({key: value for key, value in identity.items() if entry.get(key) is None})
            if resumed_run and resumed_run.get("id") and entry.get("id") is None:
                if valid_run_id(resumed_run["id"]):
                    overrides.update(id=resumed_run["id"], resume="allow")
                else:  # tracking.training_runs leaves such ids out; a reference from elsewhere is checked here
                    log.warning("W&B: the run id %r of the checkpoint training resumes from is not a W&B run id "
                                "(letters, digits, - and _ only); logger %r starts a new W&B run",
                                resumed_run["id"], name)
            if config is not None:
                wandb_config["config"] = dict(config)  # goes to wandb.init(config=...)
        elif target.endswith("TensorBoardLogger"):
            _require_tensorboard(name)
        Path(overrides.get("save_dir", entry.get("save_dir"))).mkdir(parents=True, exist_ok=True)
        # a partial first: instantiate's own first parameter is called `config`
        logger = instantiate(entry, _partial_=True, **overrides)(**wandb_config)
        if target.endswith("WandbLogger"):
            failure = _start_wandb_run(logger, name, entry)
            if failure:
                failures.append(failure)
                continue
        if config is not None and not target.endswith("WandbLogger"):
            logger.log_hyperparams(dict(config))
        loggers.append(logger)
    others = ", ".join(type(logger).__name__ for logger in loggers) or "no logger (logger=csv adds one)"
    for failure in failures:
        log.warning("%s; the run goes on with the other loggers: %s", failure, others)
    return loggers
