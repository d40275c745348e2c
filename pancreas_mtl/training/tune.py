"""The hyperparameter study of ``python tune.py`` / ``pancreas-mtl tune`` (pancreas_mtl.commands.tune).

Composes conf/tune.yaml (conf/train.yaml, the search space conf/hparams_search/<name>.yaml and the
study settings ``tune.*``) and runs Optuna trials until the study in ``tune.storage`` has
``tune.n_trials`` finished ones. Each trial is :func:`pancreas_mtl.training.train.train` in this
process on the composed train config plus the sampled overrides, in its own run folder
``<tune.study_dir>/trial_<number>_<params>``, and returns the best validation ``optimized_metric`` of
its run. Each trial holds ``data.inner_validation.sweep_cases`` of its training cases out (where
``data.inner_validation.cases`` is null) and is ranked on them (``select/*``), so the study does not pick
on the validation split it reports; ``tune.retrain_best`` then trains the best settings again on every
case. A pruner stops trials whose validation metric falls behind (Optuna's Lightning callback,
handed to the trial's run with its live trial). Several workers (the same command in other processes or
SLURM jobs) share one study through the storage; a worker killed mid-trial leaves a trial whose
heartbeat stops, which the next worker to start fails and queues again.

Hydra's sweeper plugin for Optuna (hydra-optuna-sweeper 1.3) pins optuna < 3, whose database storage
fails with SQLAlchemy 2, hence this thin driver over a current Optuna.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from pancreas_mtl.config import config_dir, expand_shorthands
from pancreas_mtl.files import save_json
from pancreas_mtl.output_guard import OutputFolder
from pancreas_mtl.training.inner_validation import resolve_inner_validation, trial_ranking
from pancreas_mtl.training.train import check_settings, train
from pancreas_mtl.training.tune_storage import (TuneError, check_fixed_overrides, claim_study_dir, fixed_overrides,
                                                open_storage, retry_callback_class)

log = logging.getLogger("tune")
FINISHED = ("COMPLETE", "PRUNED")
BEST_FILE = "best.json"  # in tune.study_dir, beside the trials' run folders and study.json


class SurplusTrial(RuntimeError):
    """Two workers asked for the study's last trial at once: the later one is failed untrained."""


def compose_tune(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("tune", overrides=expand_shorthands(overrides), return_hydra_config=True)  # pretrained=PATH
    HydraConfig.instance().set_config(cfg)
    return cfg


def check_search_space(cfg: DictConfig, overrides: list[str]) -> dict:
    params = OmegaConf.to_container(cfg.tune.params) if cfg.tune.get("params") else {}
    if not params:
        raise TuneError("tune.params is empty: choose a search space, hparams_search=<name> "
                        f"(conf/hparams_search/: {sorted(p.stem for p in (config_dir() / 'hparams_search').glob('*.yaml'))})")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    weights = combined_weights(cfg)
    for key, spec in params.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        expected = {"float": {"low", "high"}, "int": {"low", "high"}, "categorical": {"choices"}}.get(kind)
        if expected is None or not expected <= set(spec):
            raise TuneError(f"tune.params.{key}: expected {{type: float|int, low, high}} or {{type: categorical, "
                            f"choices}}, found {spec}")
        if key in given:
            raise TuneError(f"{key} is searched (tune.params) and also set on the command line; drop one")
        for value in spec["choices"] if kind == "categorical" else (spec["low"], spec["high"]):
            try:  # an unknown key or group option fails now, with Hydra's message, not in trial 0
                trial_cfg = compose_tune([*overrides, f"{key}={value}"])
            except Exception as error:
                raise TuneError(f"tune.params.{key}={value} does not compose with conf/train.yaml: {error}") from error
            try:  # and a value no trial could train with (data.batch_size=0, too few steps to validate)
                check_trial_settings(trial_cfg)
            except ValueError as error:
                raise TuneError(f"tune.params.{key}={value}: {error}") from None
            if combined_weights(trial_cfg) != weights:  # e.g. an experiment with a combined score of its own
                raise TuneError(f"tune.params.{key}={value} changes module.combined_metric from {weights} to "
                                f"{combined_weights(trial_cfg)}: the trials would be ranked on different scores "
                                "(select/combined, val/combined); search keys that keep it, or set it on the "
                                "command line for every trial")
    return params


def combined_weights(cfg: DictConfig) -> dict | None:
    """The weights of a run config's combined score (``module.combined_metric``), as its trial ranks by them."""
    weights = OmegaConf.select(cfg, "module.combined_metric")
    return None if weights is None else OmegaConf.to_container(weights, resolve=True)


def check_trial_settings(cfg: DictConfig) -> None:
    """train.py's checks of a run's settings, where a run that never validates is an error: a trial
    returns the best validation ``optimized_metric``."""
    check_settings(cfg, need_validation=True)


def check_one_device(cfg: DictConfig) -> None:
    """Lightning's DDP starts its other ranks by running the entry point again, which here would start
    more trials; parallelism in a study comes from workers, one per device."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    one_device = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one_device or "ddp" in str(trainer.get("strategy", "auto")) or trainer.get("num_nodes", 1) != 1:
        raise TuneError(f"a trial trains on one device, found trainer.devices={devices}, strategy="
                        f"{trainer.get('strategy', 'auto')}, num_nodes={trainer.get('num_nodes', 1)}; start one "
                        "worker per GPU instead (CUDA_VISIBLE_DEVICES=<i> python tune.py ...)")


def check_objective(cfg: DictConfig) -> None:
    """The value a trial returns is its checkpoint callback's best: that callback must rank as the study does."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    if checkpoint.get("monitor") != cfg.optimized_metric:
        log.warning("no callbacks.model_checkpoint monitors %s: a trial returns its last validated value, not its best",
                    cfg.optimized_metric)
    elif {"max": "maximize", "min": "minimize"}.get(checkpoint.get("mode", "min")) != cfg.tune.direction:
        raise TuneError(f"tune.direction={cfg.tune.direction} but callbacks.model_checkpoint keeps the "
                        f"{checkpoint.get('mode', 'min')} of {cfg.optimized_metric}; set both the same way")


def retried_folder(trial, study_dir: Path) -> Path | None:
    """The run folder of the trial this one retries (its worker was killed), where it resumes; None if new."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = retry_callback_class().retry_history(frozen)
    found = sorted(study_dir.glob(f"trial_{history[0]:04d}_*")) if history else []
    return found[0] if found else None


def suggest(trial, params: dict) -> dict:
    values = {}
    for key, spec in params.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        else:
            suggest_number = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
            values[key] = suggest_number(key, spec["low"], spec["high"], log=bool(spec.get("log", False)),
                                         **({"step": spec["step"]} if spec.get("step") is not None else {}))
    return values


def trial_folder(study_dir: Path, number: int, values: dict) -> Path:
    def short(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    params = ",".join(f"{re.split('[./]', key)[-1]}={short(value)}" for key, value in values.items())
    return study_dir / re.sub(r"[^\w.,=+-]", "_", f"trial_{number:04d}_{params}")[:200]


def trial_config(overrides: list[str], values: dict, run_dir: Path) -> DictConfig:
    """The train config of one trial: the command line plus the sampled values, run folder ``run_dir``,
    resuming from the folder's newest checkpoint if there is one (a retried trial)."""
    sampled = [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()]
    cfg = compose_tune([*overrides, *sampled])
    check_trial_settings(cfg)  # before the trial's folder is written
    resolve_inner_validation(cfg, trial_ranking(cfg))  # null: the trial holds sweep_cases out to be ranked on
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        # last.ckpt, or hpc_ckpt_N.ckpt that Lightning writes on SLURM's requeue signal: the newest
        saved = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        cfg.ckpt_path = str(max(saved, key=lambda p: p.stat().st_mtime_ns)) if saved else None
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb:  # the study is the W&B group, each trial a run named from its folder
            wandb.group = wandb.group or cfg.tune.study_name
            wandb.name = wandb.name or run_dir.name
            wandb.job_type = "tune"
        del cfg["hydra"]  # as under @hydra.main, the run config carries neither Hydra's node nor the study's
        del cfg["tune"]
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([*overrides, *sampled]), run_dir / ".hydra" / "overrides.yaml")
    return cfg


def pruning_callback(trial, monitor: str):
    """Optuna's Lightning pruning callback for ``trial``, reporting the run's ``monitor`` to the study."""
    from optuna_integration import PyTorchLightningPruningCallback

    return PyTorchLightningPruningCallback(trial, monitor=monitor)


@contextlib.contextmanager
def trial_log(log_file: Path):
    """This process's log records also go to the trial's ``train.log`` while it trains."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def count(study, *states: str) -> int:
    return sum(trial.state.name in states for trial in study.get_trials(deepcopy=False))


def run_study(overrides: list[str]) -> dict:
    """One worker: trials until the study has tune.n_trials finished ones; returns the best so far."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    taken_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    cfg = compose_tune(overrides)
    try:
        check_trial_settings(cfg)
    except ValueError as error:
        raise TuneError(str(error)) from None
    params = check_search_space(cfg, overrides)
    check_one_device(cfg)
    check_objective(cfg)
    storage = open_storage(cfg)
    study_dir = Path(cfg.tune.study_dir)
    folder = claim_study_dir(study_dir, cfg)
    study = optuna.create_study(study_name=cfg.tune.study_name, storage=storage, load_if_exists=True,
                                direction=cfg.tune.direction, sampler=instantiate(cfg.tune.sampler),
                                pruner=instantiate(cfg.tune.pruner))
    check_fixed_overrides(study, fixed_overrides(overrides, cfg.tune.worker_overrides), cfg)
    log.info("study %s in %s: %d of %d trials finished", cfg.tune.study_name, cfg.tune.storage,
             count(study, *FINISHED), cfg.tune.n_trials)
    refused: list[TuneError] = []  # a trial whose sampled settings no run can train with

    def objective(trial) -> float:
        taken = sorted(t.number for t in study.get_trials(deepcopy=False, states=taken_states))
        if trial.number in taken[cfg.tune.n_trials:]:
            raise SurplusTrial(f"trial {trial.number}: another worker took the study's last trial")
        values = suggest(trial, params)
        run_dir = retried_folder(trial, study_dir) or trial_folder(study_dir, trial.number, values)
        try:
            run_cfg = trial_config(overrides, values, run_dir)
        except ValueError as error:  # checked before training: the trial fails untrained, the worker stops
            refused.append(TuneError(f"trial {trial.number} {values}: {error}"))
            trial.set_user_attr("refused", str(error))
            return float("nan")  # Optuna fails a trial whose value is NaN (no traceback of our own making)
        log.info("trial %d: %s -> %s%s", trial.number, values, run_dir,
                 f", resuming from {run_cfg.ckpt_path}" if run_cfg.ckpt_path else "")
        with trial_log(run_dir / "train.log"):
            metric = train(run_cfg, extra_callbacks=[pruning_callback(trial, run_cfg.optimized_metric)])
        if metric is None:
            raise RuntimeError(f"trial {trial.number} ({run_dir}) logged no {run_cfg.optimized_metric}: validate at "
                               "least once (trainer.check_val_every_n_epoch <= trainer.max_epochs)")
        return metric

    ran, waited = 0, False
    cap = cfg.tune.max_trials_per_worker
    while cap is None or ran < cap:
        fail_stale_trials(study)  # a killed worker's trial: failed and queued again (tune.max_retry)
        if count(study, *FINISHED, "RUNNING") >= cfg.tune.n_trials:
            if waited or not count(study, "RUNNING"):
                break
            # the trials left are running; one may be a killed worker's whose heartbeat has not yet gone stale
            time.sleep(cfg.tune.grace_period + cfg.tune.heartbeat_interval)
            waited = True
            continue
        study.optimize(objective, n_trials=1, gc_after_trial=True, catch=(SurplusTrial,))
        if refused:
            raise refused[0]
        ran += 1
    retrained = retrain_best(study, overrides, cfg.tune.n_trials, study_dir, folder) if cfg.tune.retrain_best else None
    return summarise(study, folder, retrained)


RETRAIN_LOCK = "retrain"  # one worker retrains the best trial; the others go on


def retrain_best(study, overrides: list[str], n_trials: int, study_dir: Path, folder: OutputFolder) -> dict | None:
    """The best trial's settings trained again on every training case (``data.inner_validation.cases=0``,
    the same run length) in ``<study_dir>/retrained_trial_<number>/``, once the study has all its trials
    (``tune.retrain_best``); its ``last.ckpt`` is the study's model. One worker retrains while the others
    stop; a killed retrain resumes from its last.ckpt when a worker starts again. Returns the retrain's
    record for best.json, None where nothing was retrained (yet)."""
    if count(study, *FINISHED) < n_trials or not count(study, "COMPLETE"):
        log.info("tune.retrain_best: the study has %d of %d trials finished, %d complete; the worker that finishes "
                 "the last one retrains the best", count(study, *FINISHED), n_trials, count(study, "COMPLETE"))
        return None
    best = study.best_trial
    run_dir = study_dir / f"retrained_trial_{best.number:04d}"
    record = {"trial": best.number, "params": best.params, "folder": str(run_dir),
              "checkpoint": str(run_dir / "checkpoints" / "last.ckpt")}
    if (run_dir / "retrained.json").is_file():
        return record
    with folder.try_lock(RETRAIN_LOCK) as held:
        if not held:
            log.info("tune.retrain_best: another worker is retraining trial %d in %s", best.number, run_dir)
            return None
        run_cfg = trial_config([*overrides, "data.inner_validation.cases=0"], best.params, run_dir)
        log.info("tune.retrain_best: trial %d %s again on every training case -> %s%s", best.number, best.params,
                 run_dir, f", resuming from {run_cfg.ckpt_path}" if run_cfg.ckpt_path else "")
        with trial_log(run_dir / "train.log"):
            record["val_metric"] = train(run_cfg)
        save_json(record, run_dir / "retrained.json")
    return record


def summarise(study, folder: OutputFolder, retrained: dict | None = None) -> dict:
    summary = {"study_name": study.study_name, "finished": count(study, *FINISHED),
               "complete": count(study, "COMPLETE"), "pruned": count(study, "PRUNED"), "failed": count(study, "FAIL")}
    if summary["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    if retrained is not None:
        summary["retrained"] = retrained
    if folder.may_write(BEST_FILE):
        with folder.lock():  # several workers may finish at once
            save_json(summary, folder.path / BEST_FILE)
            folder.record(".best", [BEST_FILE])
    log.info("study %s: %s", study.study_name, summary)
    return summary
