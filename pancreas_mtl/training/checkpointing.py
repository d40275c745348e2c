"""Writing training checkpoints so that a killed run can always resume: last.ckpt after every epoch and,
optionally, every N steps, each written atomically beside its final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pancreas_mtl.files import atomic_path


class LastCheckpoint(L.Callback):
    """``last.ckpt`` (the full training state, for resuming) at the end of every ``every_n_epochs``-th
    training epoch, validated or not.

    Lightning's ModelCheckpoint with ``save_top_k=0, save_last=True`` (2.6) writes ``last.ckpt`` only in a
    step where it also saved a top-k checkpoint, so it wrote none before the end of training and a killed
    run had nothing to resume from. ``trainer.save_checkpoint`` goes through the run's checkpoint IO (atomic
    here) and writes on rank 0 only.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int):
        if int(every_n_epochs) < 1:
            raise ValueError(f"last_checkpoint.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_epochs = int(every_n_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        trainer.save_checkpoint(self.path)


def step_checkpoint(dirpath: str | Path, every_n_train_steps: int) -> ModelCheckpoint | None:
    """A callback writing ``last.ckpt`` every N optimizer steps, besides the epoch-end one, so a killed run
    loses at most N steps; None (no callback) for N = 0 (``callbacks.step_checkpoint`` in the config)."""
    if not every_n_train_steps:
        return None
    return ModelCheckpoint(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=int(every_n_train_steps),
                           enable_version_counter=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a local checkpoint goes to a temporary file beside its final
    name and is renamed over it: Lightning's own writer stages it in the system's temporary folder,
    and where that is another disk than the run folder the final move is a copy, which a kill can cut
    short, leaving a truncated ``last.ckpt`` and nothing to resume from."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
