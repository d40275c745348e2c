"""Refusals of train.py, predict.py and tune.py as one line, ``error: <message>``, not a traceback.

A refusal is an error whose message names the file or key and what was wrong: the run stops with exit
status 1, or 2 for a usage problem (a required key left out, an unknown key, a value of the wrong type),
as the ``pancreas-mtl`` commands do (pancreas_mtl/commands/cli.py). Any other exception is a bug and keeps its
traceback, and so does every error with ``HYDRA_FULL_ERROR=1``.

``@hydra.main`` catches a task function's exceptions and prints them with a traceback, so the entry
points catch refusals inside the task function (:func:`one_line_refusals`). A refused run whose folder
holds nothing but what Hydra wrote before the task started (``.hydra/`` and the log) leaves no folder.
In a multirun (``-m``) each refused job prints its line and counts as a failed job for Hydra, which goes
on as it does with any failed job and exits 1.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              MissingMandatoryValue, OmegaConfBaseException, ValidationError)

# A config the command line got wrong: exit status 2, as pancreas-mtl's usage errors. (ValidationError,
# a value of the wrong type, is also a ValueError: usage is looked for first.)
USAGE_ERRORS: tuple[type[BaseException], ...] = (MissingMandatoryValue, ConfigKeyError, ConfigAttributeError,
                                                 InterpolationResolutionError, ValidationError)
# A file or value refused with a message naming it: exit status 1. ValueError covers the package's own
# refusals: DataError, DatasetError (pancreas_mtl/raw/errors.py), UntrustedConfigError (a checkpoint's
# config outside the allowlist), PlanError, OutputFolderError.
REFUSALS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                             IsADirectoryError, PermissionError)
# what Hydra writes before the task function runs, besides the job log: .hydra/ (hydra.output_subdir)
HYDRA_DIR, HYDRA_FILES = ".hydra", {"config.yaml", "hydra.yaml", "overrides.yaml"}


class RefusedJob(CompactHydraException):
    """A multirun job refused (its one-line error is printed above): Hydra reports it as a failed job."""


def is_refusal(error: BaseException, usage: tuple[type[BaseException], ...] = ()) -> bool:
    return isinstance(error, USAGE_ERRORS + usage + REFUSALS)


def exit_status(error: BaseException, usage: tuple[type[BaseException], ...] = ()) -> int:
    """2 for a usage problem (``USAGE_ERRORS`` and the caller's own ``usage`` types), 1 for another refusal."""
    return 2 if isinstance(error, USAGE_ERRORS + usage) else 1


def message(error: BaseException, cfg: Any = None) -> str:
    """The refusal's message: for OmegaConf's errors the key and their first line (every required key
    ``cfg`` leaves out, for a missing one), else the error's own text."""
    if not isinstance(error, OmegaConfBaseException):
        return str(error) or type(error).__name__
    key = getattr(error, "full_key", None)
    if isinstance(error, MissingMandatoryValue) and key:
        missing = [key, *(name for name in _missing_keys(cfg) if name != key)]
        return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (??? in {_config_file()}): "
                f"pass {' '.join(f'{name}=...' for name in missing)} on the command line")
    first_line = str(getattr(error, "msg", None) or error).splitlines()[0]
    return f"{key}: {first_line}" if key and not first_line.startswith(f"{key}:") else first_line


def _config_file() -> str:
    """The entry config of this Hydra job, conf/<name>.yaml, as far as it is known."""
    hydra_cfg = _hydra_config()
    name = hydra_cfg.job.get("config_name") if hydra_cfg is not None else None
    return f"conf/{name}.yaml" if name else "the config"


def _missing_keys(cfg: Any) -> list[str]:
    """The top-level keys of ``cfg`` left at ``???``."""
    from omegaconf import DictConfig, OmegaConf

    return [str(name) for name in cfg if OmegaConf.is_missing(cfg, name)] if isinstance(cfg, DictConfig) else []


def report(error: BaseException, usage: tuple[type[BaseException], ...] = (), cfg: Any = None) -> int:
    """Print the refusal as ``error: <message>`` on stderr; returns its exit status."""
    print(f"error: {message(error, cfg)}", file=sys.stderr, flush=True)
    return exit_status(error, usage)


def one_line_refusals(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A ``@hydra.main`` task function whose refusals print one line and exit (1, or 2 for usage); place it
    under ``@hydra.main``. In a multirun the refused job raises :class:`RefusedJob` for Hydra to count."""

    @functools.wraps(task)
    def task_function(cfg):
        try:
            return task(cfg)
        except Exception as error:
            if not is_refusal(error):
                raise  # a bug: Hydra prints its traceback
            remove_untouched_run_folder()
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            status = report(error, cfg=cfg)
            if _is_multirun():
                raise RefusedJob(f"job {_job_number()} was refused: {message(error, cfg)}") from error
            sys.exit(status)

    return task_function


def _hydra_config():
    """This Hydra job's ``hydra`` node; None outside a job (a config composed in code has no run folder)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if OmegaConf.select(hydra_cfg, "runtime.output_dir", throw_on_missing=False) else None


def _is_multirun() -> bool:
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def _job_number() -> str:
    hydra_cfg = _hydra_config()
    return str(hydra_cfg.job.get("num", "")) if hydra_cfg is not None else ""


def _first_process() -> bool:
    """Not one of DDP's later ranks or SLURM's later tasks, which share rank 0's run folder."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def remove_untouched_run_folder() -> Path | None:
    """Remove this Hydra job's run folder if it holds only what Hydra writes before the task function runs
    (``.hydra/`` with config.yaml, hydra.yaml, overrides.yaml, and the job's log); returns it if removed.
    A folder holding anything else (a file of the run's own, an earlier run's checkpoints) is kept."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None or not _first_process():
        return None
    folder = Path(hydra_cfg.runtime.output_dir)
    if not folder.is_dir() or folder.is_symlink():
        return None
    logs = _log_handlers_in(folder)
    for entry in folder.iterdir():
        if entry.name == HYDRA_DIR and entry.is_dir() and not entry.is_symlink():
            if not all(p.is_file() and p.name in HYDRA_FILES for p in entry.iterdir()):
                return None
        elif not (entry.is_file() and entry.name in {Path(h.baseFilename).name for h in logs}):
            return None
    for handler in logs:  # nothing writes into the folder again
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if handler in getattr(logger, "handlers", []):
                logger.removeHandler(handler)
        handler.close()
    shutil.rmtree(folder)
    return folder


def _log_handlers_in(folder: Path) -> list[logging.FileHandler]:
    """The logging handlers writing a file directly in ``folder`` (Hydra's job log)."""
    handlers = {handler for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                for handler in getattr(logger, "handlers", [])}
    return [handler for handler in handlers if isinstance(handler, logging.FileHandler)
            and Path(handler.baseFilename).parent == folder]
