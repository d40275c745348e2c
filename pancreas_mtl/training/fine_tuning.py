"""Fine-tuning a warm-started network: its own learning rate for the pretrained layers, and a frozen encoder
for the first epochs.

- ``pretrained.lr_scale``: the optimizer gets two parameter groups, the layers the warm start loaded at
  ``lr_scale`` x the optimizer's lr, and the new ones (the head, the segmentation outputs, re-initialised
  layers) at its lr. The lr schedule (``scheduler``, with its linear ``warmup_steps``) scales both alike.
- ``pretrained.freeze_epochs``: for the first N epochs the pretrained encoder's gradients are dropped
  before every optimizer step, so its weights (and their momenta and weight decay) stay as loaded while
  the decoder and the head adapt to them; from epoch N on it trains. The gradients are dropped rather
  than ``requires_grad`` turned off, so DDP's reducer sees the same parameters every step and a resumed
  run freezes exactly where the uninterrupted one did (the rule is a function of the epoch only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import lightning as L
from torch import nn

from pancreas_mtl.training.warm_start import part_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuning:
    """Which parameters a warm start loaded, and how they train.

    Attributes:
        pretrained: names (MultiTaskNet keys) of the parameters the warm start loaded.
        lr_scale: their learning rate relative to the new parameters'.
        freeze_epochs: epochs during which the loaded encoder parameters do not change.
    """

    pretrained: frozenset[str]
    lr_scale: float
    freeze_epochs: int

    def __post_init__(self) -> None:
        if not self.lr_scale >= 0:
            raise ValueError(f"pretrained.lr_scale must be >= 0, got {self.lr_scale}")
        if int(self.freeze_epochs) != self.freeze_epochs or self.freeze_epochs < 0:
            raise ValueError(f"pretrained.freeze_epochs must be a whole number >= 0, got {self.freeze_epochs}")

    def frozen(self) -> frozenset[str]:
        """The parameters ``freeze_epochs`` holds still: the loaded encoder's."""
        return frozenset(name for name in self.pretrained if part_of(name) == "encoder")


def parameter_groups(model: nn.Module, fine_tuning: FineTuning | None) -> list:
    """The optimizer's parameters: a plain list without a warm start (the optimizer's one group), else a
    ``new`` and a ``pretrained`` group, the latter with ``lr_scale`` (applied by :func:`scale_learning_rates`)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if fine_tuning is None:
        return [p for _, p in named]
    groups = [{"name": "new", "lr_scale": 1.0, "params": [p for n, p in named if n not in fine_tuning.pretrained]},
              {"name": "pretrained", "lr_scale": float(fine_tuning.lr_scale),
               "params": [p for n, p in named if n in fine_tuning.pretrained]}]
    return [group for group in groups if group["params"]]


def scale_learning_rates(optimizer) -> None:
    """Each group's lr times its ``lr_scale`` (before the schedule reads the initial lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * float(group.get("lr_scale", 1.0))


class FreezeEncoder(L.Callback):
    """Drops the gradients of the pretrained encoder before each optimizer step of the first ``epochs`` epochs."""

    def __init__(self, parameter_names: Iterable[str], epochs: int):
        self.parameter_names = frozenset(parameter_names)
        self.epochs = int(epochs)
        self._announced = -1

    def _parameters(self, pl_module: L.LightningModule) -> list[nn.Parameter]:
        return [p for name, p in pl_module.model.named_parameters() if name in self.parameter_names]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.epochs and self._announced < 0:
            log.info("pretrained.freeze_epochs=%d: the pretrained encoder (%d tensors) is frozen until epoch %d",
                     self.epochs, len(self.parameter_names), self.epochs)
            self._announced = epoch
        elif epoch == self.epochs and self.epochs > 0:
            log.info("epoch %d: the pretrained encoder trains from now on", epoch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.current_epoch >= self.epochs:
            return
        for parameter in self._parameters(pl_module):
            parameter.grad = None  # torch's optimizers leave a parameter without a gradient as it is
