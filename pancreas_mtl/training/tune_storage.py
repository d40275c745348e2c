"""Where a tune.py study lives (pancreas_mtl.training.tune): its Optuna database, which retries the trials
of killed workers, its folder under the output-folder guard, and the overrides every worker of the study
shares.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pancreas_mtl.files import save_json
from pancreas_mtl.output_guard import RECORDS_DIR, OutputFolder, OutputFolderError, read_manifest

log = logging.getLogger("tune")
STUDY_FILE = "study.json"  # in tune.study_dir: which study the folder holds


class TuneError(ValueError):
    """A study that cannot start: wrong storage, folder or search space."""


def retry_callback_class():
    """Optuna's callback that queues a stale trial again: RetryHeartbeatStaleTrialCallback from Optuna 5 on."""
    import optuna

    return getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


def open_storage(cfg: DictConfig):
    import optuna

    url = str(cfg.tune.storage)
    if "://" not in url:
        raise TuneError(f"tune.storage={url!r} is not a database URL; for a file write sqlite:///{Path(url).absolute()}")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    retry = retry_callback_class()(max_retry=cfg.tune.max_retry)
    retry_kwarg = ({"heartbeat_stale_trial_callback": retry} if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                   else {"failed_trial_callback": retry})
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=cfg.tune.heartbeat_interval,
                                          grace_period=cfg.tune.grace_period, **retry_kwarg)
    except Exception as error:
        raise TuneError(f"tune.storage={url}: cannot open the study database ({type(error).__name__}: {error})") from error


def claim_study_dir(study_dir: Path, cfg: DictConfig) -> OutputFolder:
    """One folder, one study (the output-folder guard): a folder holding another study's trials, or anything
    this tool did not write, is refused."""
    marker = study_dir / STUDY_FILE
    identity = {"study_name": str(cfg.tune.study_name)}
    found = read_manifest(marker)
    if found is not None and found.get("study_name") != cfg.tune.study_name:
        raise TuneError(f"tune.study_dir={study_dir} holds study {found.get('study_name')!r} ({STUDY_FILE}), not "
                        f"{cfg.tune.study_name!r}; choose another tune.study_dir or tune.study_name")
    if found is not None and not (study_dir / RECORDS_DIR).is_dir():  # a study an earlier version started
        folder = OutputFolder(study_dir, "tune", identity).claim()
        folder.record(".study", [STUDY_FILE])
        return folder
    try:
        folder = OutputFolder.open(study_dir, "tune", identity=identity, writes=[STUDY_FILE])
    except OutputFolderError as error:
        raise TuneError(f"tune.study_dir={study_dir}: {error}") from None
    if folder.may_write(STUDY_FILE):
        save_json({"study_name": cfg.tune.study_name, "storage": str(cfg.tune.storage)}, marker)
        folder.record(".study", [STUDY_FILE])
    return folder


FIXED_OVERRIDES = "fixed_overrides"  # the study's user attribute: {key: override} of the worker that created it


def fixed_overrides(overrides: list[str], worker_overrides) -> dict[str, str]:
    """{key: override as given} of the command line's overrides that every trial of the study shares: all
    but ``tune.worker_overrides`` (and the keys below them), which may differ between workers."""
    worker_keys = [str(key) for key in worker_overrides or []]
    fixed = {}
    for override in overrides:
        key = override.split("=", 1)[0].strip().lstrip("+~")
        if not any(key == worker_key or key.startswith(f"{worker_key}.") for worker_key in worker_keys):
            fixed[key] = override.strip()  # a key given twice: the later one applies, as in Hydra
    return fixed


def check_fixed_overrides(study, fixed: dict[str, str], cfg: DictConfig) -> None:
    """Record ``fixed`` with a new study; refuse to join a study recorded with other fixed overrides,
    listing each that differs."""
    recorded = study.user_attrs.get(FIXED_OVERRIDES)
    if recorded is None and study.get_trials(deepcopy=False):
        log.warning("study %s records no fixed overrides (created by an earlier tune.py): this worker's are "
                    "not compared with those of its trials", study.study_name)
        return
    if recorded is None:
        study.set_user_attr(FIXED_OVERRIDES, fixed)
        recorded = study.user_attrs[FIXED_OVERRIDES]  # two workers creating it at once: the one that wrote last
    differences = [f"{recorded.get(key, f'no {key}')} (study) vs {fixed.get(key, f'no {key}')} (this worker)"
                   for key in sorted(set(recorded) | set(fixed)) if recorded.get(key) != fixed.get(key)]
    if differences:
        raise TuneError(f"study {study.study_name} in {cfg.tune.storage} was created with other overrides: "
                        f"{'; '.join(differences)}; start this worker with the study's overrides (tune."
                        "worker_overrides may differ), or choose another tune.study_name")
