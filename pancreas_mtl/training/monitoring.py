"""Training callbacks that report on the run itself: throughput and GPU memory as ``perf/*`` scalars to
every logger, and the W&B run's artifacts (plan and resolved config; the best and last checkpoints).

Both are entries of conf/callbacks/default.yaml. Nothing here may stop a run: W&B failures warn once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from pancreas_mtl.training.checkpointing import LastCheckpoint
from pancreas_mtl.training.run_info import update_run_info
from pancreas_mtl.tracking.settings import CHECKPOINT_KEY, config_artifact_name, run_reference

log = logging.getLogger(__name__)

GIB = 2**30


class TrainingMonitor(L.Callback):
    """``perf/train_samples_per_s``: samples per second (all processes together) over the training epoch so
    far, data loading included, logged every step; ``perf/validation_s``: seconds the validation loop took
    (its cases and their metrics; the slowest process under DDP); on CUDA ``perf/train_gpu_peak_memory_gb``
    and ``perf/validation_gpu_peak_memory_gb``, the peak memory torch allocated
    (``torch.cuda.max_memory_allocated``) on rank 0's GPU since the training epoch began (every step), and on
    the fullest GPU during the validation. Sanity-check validation is not measured."""

    def __init__(self) -> None:
        self._epoch_start = self._validation_start = 0.0
        self._samples = 0

    @staticmethod
    def _cuda(pl_module: L.LightningModule) -> torch.device | None:
        device = pl_module.device
        return device if device.type == "cuda" and torch.cuda.is_available() else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start, self._samples = time.perf_counter(), 0
        if (device := self._cuda(pl_module)) is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        size = int(batch["image"].shape[0]) if isinstance(batch, Mapping) and "image" in batch else 1
        self._samples += size * trainer.world_size
        elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
        pl_module.log("perf/train_samples_per_s", self._samples / elapsed, on_step=True, on_epoch=False,
                      batch_size=size)
        if (device := self._cuda(pl_module)) is not None:
            pl_module.log("perf/train_gpu_peak_memory_gb", torch.cuda.max_memory_allocated(device) / GIB,
                          on_step=True, on_epoch=False, batch_size=size)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()
        if not trainer.sanity_checking and (device := self._cuda(pl_module)) is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # under DDP every process calls this: the slowest process and the fullest GPU are reported
        pl_module.log("perf/validation_s", time.perf_counter() - self._validation_start, batch_size=1,
                      sync_dist=True, reduce_fx="max")
        if (device := self._cuda(pl_module)) is not None:
            pl_module.log("perf/validation_gpu_peak_memory_gb", torch.cuda.max_memory_allocated(device) / GIB,
                          batch_size=1, sync_dist=True, reduce_fx="max")


class WandbArtifacts(L.Callback):
    """What a W&B training run keeps besides its curves; does nothing without a W&B logger.

    At the start of ``fit``: the artifact ``config-<run id>`` (type ``config``: ``plan.json``, the resolved
    ``config.yaml``, and from the run folder ``fingerprint.json`` and Hydra's ``overrides.yaml``), and the
    run's reference (id, project, entity, group, name) in the run folder's ``run_info.json`` and in every
    checkpoint (``checkpoint["wandb"]``), which predict.py and ``pancreas-mtl evaluate`` record as
    ``train_run_id``. With ``log_model`` (``logger.wandb.log_model``), at the end of a successful ``fit``:
    the best checkpoint (of each ModelCheckpoint with a ``monitor``) and ``last.ckpt`` as versions of the
    artifact ``model-<run id>`` (type ``model``, aliases ``best`` and ``last``/``latest``). Offline runs keep
    the artifacts (copied into W&B's staging folder) until ``wandb sync`` uploads them.
    """

    def __init__(self, log_model: bool):
        self.log_model = bool(log_model)
        self._run: Any = None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, error: Exception) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("W&B: could not log the %s (%s: %s); the run goes on", key, type(error).__name__, error)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self._run is not None:
            return
        logger = next((lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"), None)
        if logger is None:
            return
        try:
            self._run = logger.experiment
            reference = run_reference(self._run)
            update_run_info(Path(trainer.default_root_dir), wandb=reference)
            self._log_config(pl_module, Path(trainer.default_root_dir), reference["id"])
        except Exception as error:  # noqa: BLE001 - a dashboard is never a reason to stop training
            self._warn_once("run config artifact", error)

    def _log_config(self, pl_module: L.LightningModule, run_dir: Path, run_id: str) -> None:
        import wandb

        plan = getattr(pl_module, "plan", None)
        artifact = wandb.Artifact(config_artifact_name(run_id), type="config",
                                  metadata={"plan_preset": getattr(plan, "preset", None)})
        if plan is not None:
            with artifact.new_file("plan.json") as stream:
                json.dump(plan.to_dict(), stream, indent=2)
        config = getattr(pl_module, "config", None)
        if config is not None:
            with artifact.new_file("config.yaml") as stream:
                yaml.safe_dump(config, stream, sort_keys=False)
        for source, name in ((run_dir / "fingerprint.json", "fingerprint.json"),
                             (run_dir / ".hydra" / "overrides.yaml", "overrides.yaml")):
            if source.is_file():
                artifact.add_file(str(source), name=name)
        self._run.log_artifact(artifact, aliases=["latest"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._run is not None:
            try:
                checkpoint[CHECKPOINT_KEY] = run_reference(self._run)
            except Exception as error:  # noqa: BLE001
                self._warn_once("run id into the checkpoint", error)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_model or self._run is None or not trainer.is_global_zero:
            return
        try:
            self._log_checkpoints(trainer)
        except Exception as error:  # noqa: BLE001
            self._warn_once("checkpoints as model artifacts", error)

    def _log_checkpoints(self, trainer: L.Trainer) -> None:
        import wandb

        name = f"model-{self._run.id}"
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "best_model_path", "")
            if getattr(callback, "monitor", None) and path and Path(path).is_file():
                score = callback.best_model_score
                artifact = wandb.Artifact(name, type="model", metadata={
                    "file": Path(path).name, "monitor": callback.monitor,
                    "score": None if score is None else float(score)})
                artifact.add_file(path, name="model.ckpt")
                self._run.log_artifact(artifact, aliases=["best"])
        last = [callback.path for callback in trainer.callbacks if isinstance(callback, LastCheckpoint)]
        last += [Path(callback.last_model_path) for callback in trainer.checkpoint_callbacks
                 if getattr(callback, "last_model_path", "")]
        last = [path for path in last if path.is_file()]
        if last:
            newest = max(last, key=lambda path: path.stat().st_mtime_ns)
            artifact = wandb.Artifact(name, type="model", metadata={"file": newest.name,
                                                                    "epoch": trainer.current_epoch,
                                                                    "global_step": trainer.global_step})
            artifact.add_file(str(newest), name="model.ckpt")
            self._run.log_artifact(artifact, aliases=["last", "latest"])
