"""The training run of ``python train.py`` / ``pancreas-mtl train`` (pancreas_mtl.commands.train) and of
each tune.py trial: for a config composed from conf/train.yaml it prepares the dataset (discovery, checks, fingerprint, plan, preprocessing
cache), builds the network, loss, LightningModule, loggers, callbacks and trainer, and fits. The run
folder (Hydra's output dir) keeps the resolved config, the plan, the fingerprint, the checkpoints
(which carry the plan and config too) and the logs. Returns the best ``optimized_metric`` for sweeps.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.training.checkpointing import AtomicCheckpointIO
from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.dataset.prepare import prepare_dataset, prepare_shard
from pancreas_mtl.dataset.settings import data_settings
from pancreas_mtl.devices import set_tf32
from pancreas_mtl.files import save_json
from pancreas_mtl.config import config_differences
from pancreas_mtl.inference.checkpoint import read_checkpoint
from pancreas_mtl.training.inner_validation import ranking_of_this_run, resolve_inner_validation
from pancreas_mtl.training.loggers import build_loggers
from pancreas_mtl.training.module import build_module
from pancreas_mtl.planning.planner import describe_plan
from pancreas_mtl.training.run_info import write_run_info
from pancreas_mtl.tracking.settings import training_runs
from pancreas_mtl.training.validation_schedule import validation_problem
from pancreas_mtl.training.fine_tuning import FineTuning, FreezeEncoder
from pancreas_mtl.training.pretrained_sources import PretrainedSource, read_pretrained
from pancreas_mtl.training.warm_start import PARTS, REPORT_FILE, read_loaded_names, warm_start, write_report
from pancreas_mtl.planning.plan import Plan

log = logging.getLogger("train")


def prepare(cfg: DictConfig, source_plan: Plan | None = None, source: str = "") -> PancreasDataModule:
    """Dataset preparation and the data module; the plan and fingerprint are copied into the run folder.
    ``source_plan``: the pretrained network's plan, which ``planning=from_pretrained`` adopts."""
    prepared = prepare_dataset(cfg.data, cfg.planning, progress=cfg.data.progress, source_plan=source_plan,
                               source=source)
    run_dir = Path(cfg.paths.output_dir)
    if is_first_process():  # DDP: run files from rank 0 only
        save_json(prepared.plan.to_dict(), run_dir / "plan.json")
        shutil.copy2(prepared.cache_root / "fingerprint.json", run_dir / "fingerprint.json")
    log.info("plan (%s preset):\n%s", prepared.plan.preset, describe_plan(prepared.plan))
    return PancreasDataModule(prepared, cfg.data, cfg.augmentation, seed=cfg.seed)


# --- DDP (trainer=ddp): Lightning starts ranks 1.. by running this script again, with LOCAL_RANK set ---
def is_first_process() -> bool:
    """Rank 0 of the run, known before the Trainer exists from the launchers' environment variables
    (LOCAL_RANK from Lightning's launcher, RANK from torchrun, SLURM_PROCID; NODE_RANK across nodes)."""
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
# --- end DDP ---


def check_one_batch(datamodule: PancreasDataModule) -> None:
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    log.info("first training batch: image %s, label %s, subtypes %s, cases %s", tuple(batch["image"].shape),
             tuple(batch["label"].shape), batch["subtype"].tolist(), batch["case_id"])


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list:
    callbacks = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if not spec or not spec.get("_target_"):
            continue
        if name == "learning_rate_monitor" and not with_logger:
            continue  # Lightning refuses it without a logger
        callback = instantiate(spec)
        if callback is not None:  # a factory may decline (step_checkpoint with every_n_train_steps=0)
            callbacks.append(callback)
    return callbacks


# --- clusters: SLURM requeue and auto-resume (docs/scaling.md) -----------------------------------------

def resume_checkpoint(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: ``ckpt_path`` as given, or for ``auto`` the newest of
    the run folder's ``checkpoints/last.ckpt`` and ``hpc_ckpt_N.ckpt`` (what Lightning saves on SLURM's
    requeue signal), None (a fresh start) when there is neither. A requeued SLURM job re-runs the same
    Hydra job in the same run folder, so ``auto`` picks up where it stopped."""
    if ckpt_path != "auto":
        return ckpt_path or None
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime_ns)
    log.info("ckpt_path=auto: resuming from %s", newest)
    return str(newest)


def resume_changes(stored: Mapping, current: Mapping, ignore: Sequence[str]) -> list[str]:
    """The settings that differ between a checkpoint's run config and this run's, as ``key: the checkpoint's
    vs this run's``, less the keys matching a ``resume.ignore`` pattern (and the keys below them)."""
    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, f"{pattern}.*")
                   for pattern in ignore)

    return [line for line in config_differences(stored, current) if not ignored(line.split(": ", 1)[0])]


def check_resume_settings(cfg: DictConfig, ckpt_path: str, stored: Mapping, shown: int = 20) -> None:
    """Refuse to resume in this run folder from its checkpoint when that was trained with other settings,
    naming the keys that differ, unless ``resume.allow_changes`` (then a warning names them). A checkpoint
    from another folder starts this one, whose .hydra/config.yaml records its settings: not compared."""
    if not Path(ckpt_path).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve()):
        return
    resume = cfg.get("resume") or {}
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = resume_changes(stored, current, list(resume.get("ignore") or []))
    if not changes:
        return
    more = f"\n  ... and {len(changes) - shown} more" if len(changes) > shown else ""
    listed = "\n  ".join(changes[:shown]) + more
    if resume.get("allow_changes"):
        log.warning("resume.allow_changes=true: resuming %s with other settings than it was trained with "
                    "(optimizer and lr-schedule state stay the checkpoint's); checkpoint vs this run:\n  %s",
                    ckpt_path, listed)
        return
    raise ValueError(
        f"{ckpt_path}: this run folder's checkpoint was trained with other settings than this run's, and "
        f"resuming would train one run under two configs; checkpoint vs this run:\n  {listed}\n"
        "Resume with the checkpoint's values, start a new run folder (without hydra.run.dir or "
        "hydra.sweep.dir), or pass resume.allow_changes=true to resume with this run's (keys that may differ "
        "on a resume: resume.ignore in conf/train.yaml)")


def cluster_plugins(slurm_cfg: DictConfig | None) -> list:
    """Lightning's SLURM environment with ``slurm.auto_requeue`` on ``slurm.requeue_signal`` when this
    process is a SLURM task; none elsewhere, and none under torchrun (its own environment then applies)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if not SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return []
    slurm_cfg = slurm_cfg or {}
    return [SLURMEnvironment(auto_requeue=bool(slurm_cfg.get("auto_requeue", True)),
                             requeue_signal=getattr(signal, str(slurm_cfg.get("requeue_signal", "SIGUSR1"))))]


# --- warm start (pretrained=PATH; training.warm_start, training.fine_tuning) ------------------------------

def pretrained_settings(cfg: DictConfig) -> dict | None:
    """The ``pretrained`` block when ``pretrained.path`` is set, else None."""
    settings = cfg.get("pretrained")
    if not settings or not settings.get("path"):
        return None
    return OmegaConf.to_container(settings, resolve=True)


def check_pretrained_resume(cfg: DictConfig, ckpt_path: str | None) -> bool:
    """Whether this start continues a warm-started run from its own checkpoint (True: the checkpoint holds the
    weights, the warm start is not loaded again). ``pretrained`` with a checkpoint of another run folder is
    refused: resuming restores the weights, so the two would fight over them."""
    if not ckpt_path or pretrained_settings(cfg) is None:
        return False
    if Path(ckpt_path).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve()):
        return True  # this run folder's own (its config, pretrained included, is checked against the checkpoint's)
    raise ValueError(
        f"pretrained.path={cfg.pretrained.path} together with ckpt_path={ckpt_path}: resuming a run restores its "
        "weights, and a warm start would load others; resume without pretrained (pretrained.path=null), or warm "
        f"start a new run without ckpt_path (ckpt_path=null), or start from the checkpoint's weights with "
        f"pretrained={ckpt_path}")


def start_fine_tuning(cfg: DictConfig, module, source: PretrainedSource | None, continuing: bool) -> list:
    """Load the warm start into ``module``'s network (or, continuing, take the names an earlier start loaded
    from pretrained.json), set its parameter groups, and return the callbacks fine-tuning needs."""
    settings = pretrained_settings(cfg)
    run_dir = Path(cfg.paths.output_dir)
    if continuing:
        names = read_loaded_names(run_dir)
        if names is None:
            raise ValueError(f"{run_dir}: resuming a warm-started run, but its {REPORT_FILE} (which parameters were "
                             "pretrained) is missing; start a new run folder")
    else:
        result = warm_start(module.model, source, settings["parts"])
        names = result.loaded_names
        if is_first_process():
            write_report(result, run_dir)
    module.fine_tuning = FineTuning(frozenset(names), float(settings["lr_scale"]), int(settings["freeze_epochs"]))
    if not module.fine_tuning.freeze_epochs:
        return []
    return [FreezeEncoder(module.fine_tuning.frozen(), module.fine_tuning.freeze_epochs)]


# -------------------------------------------------------------------------------------------------------

def train(cfg: DictConfig, extra_callbacks: Sequence = ()) -> float | None:
    """The whole run for a composed config; returns the best ``cfg.optimized_metric`` (None if not logged).
    ``extra_callbacks`` join the configured ones (tune.py's pruning callback, which holds its live trial)."""
    resolve_inner_validation(cfg, ranking_of_this_run(cfg, is_first_process()))  # null: 0 unless a sweep ranks it
    check_settings(cfg)  # before the run writes anything: a refused run leaves no run folder
    if cfg.get("two_phase"):  # segmentation first, then the multi-task fine-tune from it (training.two_phase)
        from pancreas_mtl.training.two_phase import run_two_phase

        return run_two_phase(cfg, train, extra_callbacks)
    # before the run writes anything or the dataset is prepared: a checkpoint refused here leaves nothing
    ckpt_path = None if cfg.prepare_only else resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir)
    stored_plan = None
    if ckpt_path:  # a truncated or foreign file, or one carrying code, fails here with its path
        _, stored_plan, stored_config = read_checkpoint(ckpt_path)
        check_resume_settings(cfg, ckpt_path, stored_config)
    continuing = check_pretrained_resume(cfg, ckpt_path)
    settings = pretrained_settings(cfg)
    source = None  # the pretrained network, read before any preprocessing so a bad path costs nothing
    if settings is not None and not continuing:
        source = read_pretrained(settings["path"], settings["fold"], settings["checkpoint"])
    source_plan = stored_plan if continuing else (source.plan if source is not None else None)
    source_name = str(settings["path"]) if settings else ""
    L.seed_everything(cfg.seed, workers=True)
    log.info("run folder %s", cfg.paths.output_dir)
    if is_first_process():  # DDP: run files from rank 0 only
        write_run_info(Path(cfg.paths.output_dir))
    if cfg.data.get("shard"):  # --- preprocessing shard: this share of the cache only (docs/scaling.md) ---
        if not cfg.prepare_only:
            raise ValueError(f"data.shard={cfg.data.shard} preprocesses one share of the cases and cannot train: "
                             "add prepare_only=true, or leave data.shard unset")
        prepare_shard(cfg.data, cfg.planning, progress=cfg.data.progress, source_plan=source_plan, source=source_name)
        return None
    datamodule = prepare(cfg, source_plan, source_name)
    if cfg.prepare_only:
        check_one_batch(datamodule)
        log.info("prepare_only: dataset planned, preprocessed and sampled; stopping before training")
        return None
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.plan, datamodule.subtype_counts())
    if settings is not None:
        extra_callbacks = [*start_fine_tuning(cfg, module, source, continuing), *extra_callbacks]
    resumed_run = next(iter(training_runs([ckpt_path])), None) if ckpt_path else None  # W&B continues its run
    loggers = build_loggers(cfg.get("logger"), cfg.paths.output_dir, config=OmegaConf.to_container(cfg, resolve=True),
                            resumed_run=resumed_run)
    set_tf32(cfg.module.get("tf32"))
    callbacks = [*build_callbacks(cfg, bool(loggers)), *extra_callbacks]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                          plugins=[AtomicCheckpointIO(), *cluster_plugins(cfg.get("slurm"))])
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            wandb.finish()
    metric = best_metric(trainer, cfg.optimized_metric)
    log.info("finished: best %s = %s; checkpoints in %s", cfg.optimized_metric,
             None if metric is None else f"{metric:.4f}", Path(cfg.paths.output_dir) / "checkpoints")
    return metric


# --- settings checked before anything is written (tune.py checks each trial's the same way) ---
def check_settings(cfg: DictConfig, need_validation: bool = False) -> None:
    """ValueError naming a ``data`` count out of range; for a run that would never validate (no
    ``optimized_metric``, no best checkpoint) a warning at the start, or ValueError if ``need_validation``."""
    data_settings(cfg.data)
    settings = pretrained_settings(cfg)
    if settings is not None:
        if settings["parts"] not in PARTS:
            raise ValueError(f"pretrained.parts={settings['parts']!r}: expected one of {', '.join(PARTS)}")
        FineTuning(frozenset(), float(settings["lr_scale"]), settings["freeze_epochs"])  # ValueError if out of range
    if cfg.prepare_only:
        return  # trains nothing, validates nothing
    problem = validation_problem(cfg.trainer, cfg.data.iterations_per_epoch)
    if problem and need_validation:
        raise ValueError(problem)
    if problem:
        log.warning("%s; this run will report no %s and save no best checkpoint", problem, cfg.optimized_metric)
# --- end settings checks ---


# --- best metric of the run (tune.py optimises it) ---
def best_metric(trainer: L.Trainer, name: str) -> float | None:
    """The best ``name`` of the run, as the ModelCheckpoint monitoring it scored it (its ``mode``);
    the last logged value where no checkpoint callback monitors it (fast_dev_run, callbacks off)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) == name and callback.best_model_score is not None:
            return float(callback.best_model_score)
    last = trainer.callback_metrics.get(name)
    return None if last is None else float(last)
# --- end best metric ---
