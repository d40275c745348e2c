"""Learning-rate schedules stepped once per optimizer step: nnU-Net's polynomial decay and warm-up cosine.

Both are ``LambdaLR`` schedules whose factor is a small picklable object, so the schedule's position
travels in a Lightning checkpoint. They are built from ``conf/scheduler/*.yaml`` as Hydra partials
and completed by :class:`pancreas_mtl.training.module.MultiTaskModule` with the run's total number of optimizer
steps (``trainer.estimated_stepping_batches``)::

    scheduler = poly_lr(optimizer, total_steps=250_000, exponent=0.9)   # nnU-Net: 1000 x 250 steps

nnU-Net updates its poly schedule once per epoch, ``lr0 * (1 - epoch / max_epochs) ** 0.9``; here it is
updated every step with ``step / total_steps``, the same curve sampled 250 times finer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_length(warmup_steps: float, total_steps: int) -> int:
    """Warm-up steps: an int is a step count, a float in (0, 1) a fraction of ``total_steps``."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if isinstance(warmup_steps, float) and 0 < warmup_steps < 1:
        return int(round(warmup_steps * total_steps))
    return int(warmup_steps)


def _check_total(total_steps: float) -> int:
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(f"a learning-rate schedule needs a finite number of optimizer steps, got {total_steps}; "
                         "set trainer.max_epochs or trainer.max_steps")
    return int(total_steps)


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far the decay after the warm-up has come at ``step``: 0 at its start, 1 at ``total_steps``."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min(max(progress, 0.0), 1.0)


@dataclass
class PolyFactor:
    """Factor of the initial lr at a step: linear warm-up, then ``(1 - progress) ** exponent``, 0 at the end."""

    total_steps: int
    exponent: float = 0.9
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return (1.0 - _decay_progress(step, self.warmup_steps, self.total_steps)) ** self.exponent


@dataclass
class CosineFactor:
    """Factor of the initial lr at a step: linear warm-up, then half a cosine from 1 to ``min_factor``."""

    total_steps: int
    warmup_steps: int = 0
    min_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = _decay_progress(step, self.warmup_steps, self.total_steps)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_lr(optimizer: Optimizer, total_steps: int, exponent: float, warmup_steps: float) -> LambdaLR:
    """nnU-Net's polynomial decay ``lr0 * (1 - step / total_steps) ** exponent`` (0.9), stepped per optimizer step.

    Args:
        optimizer: its current lrs are the initial lrs.
        total_steps: optimizer steps of the whole run; the lr reaches 0 there.
        exponent: decay exponent (nnU-Net: 0.9).
        warmup_steps: linear warm-up from lr0 / warmup to lr0 first; an int counts steps, a float in
            (0, 1) is a fraction of ``total_steps`` (nnU-Net: none).
    """
    total = _check_total(total_steps)
    return LambdaLR(optimizer, PolyFactor(total, float(exponent), warmup_length(warmup_steps, total)))


def cosine_lr(optimizer: Optimizer, total_steps: int, warmup_steps: float, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up, then cosine decay from lr0 to ``min_lr_ratio * lr0`` at ``total_steps``.

    ``warmup_steps``: an int counts steps, a float in (0, 1) is a fraction of ``total_steps``.
    """
    total = _check_total(total_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, CosineFactor(total, warmup_length(warmup_steps, total), float(min_lr_ratio)))


def as_factory(spec: Callable | Mapping | Any | None) -> Callable | None:
    """An optimizer or scheduler factory from a Hydra partial, or from its config (instantiated as a partial).

    None, or a config whose ``_target_`` is null (``conf/scheduler/none.yaml``), means none.
    """
    if spec is None or callable(spec):
        return spec
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    config = spec if isinstance(spec, DictConfig) else OmegaConf.create(dict(spec))
    if config.get("_target_") is None:
        return None
    return instantiate(config, _partial_=True)
