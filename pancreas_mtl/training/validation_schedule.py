"""Whether a training run validates at all, from its ``trainer`` and ``data`` settings, before it starts.

Lightning validates at the end of every ``check_val_every_n_epoch``-th epoch (or every
``val_check_interval`` batches of one), but not when ``max_steps`` stops training in the middle of an
epoch. A run whose first validation comes after its last step logs no validation metric, so it has no
``optimized_metric`` and its model checkpoint never saves; Lightning says nothing about it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _limited(batches: int, limit: Any) -> int:
    """Batches per epoch under Lightning's ``limit_train_batches`` / ``overfit_batches`` (int or fraction)."""
    if limit is None or isinstance(limit, bool):
        return batches
    if isinstance(limit, float) and limit <= 1.0:
        return int(batches * limit)
    return min(batches, int(limit))


def validation_problem(trainer: Mapping, iterations_per_epoch: int) -> str | None:
    """Why a run with these Trainer settings (``cfg.trainer``) and ``data.iterations_per_epoch`` never
    validates, naming the keys to change; None when it validates, or when validation is off on purpose
    (``limit_val_batches=0``), the run is a ``fast_dev_run``, or it is stopped by time or by nothing."""
    get = trainer.get
    if get("fast_dev_run") or get("limit_val_batches") == 0 or get("max_time"):
        return None
    overfit = get("overfit_batches") or 0
    batches = _limited(iterations_per_epoch, overfit if overfit else get("limit_train_batches"))
    if batches < 1:
        return None  # no training batches at all: Lightning says so itself
    accumulate = int(get("accumulate_grad_batches") or 1)  # batches per optimizer step
    every_n_epochs, interval = get("check_val_every_n_epoch", 1), get("val_check_interval")
    if isinstance(interval, str) or (every_n_epochs is None and not isinstance(interval, int)):
        return None  # a time interval ("00:01:00"), or settings Lightning refuses itself
    if every_n_epochs is None:  # every ``interval`` batches, counted over the run
        first, when = interval, f"after batch {interval} (trainer.val_check_interval={interval})"
    else:  # in every n-th epoch, after ``interval`` of its batches (an int) or that share of them
        within = interval if isinstance(interval, int) else max(1, int(batches * (interval or 1.0)))
        first = (int(every_n_epochs) - 1) * batches + within
        when = (f"after step {math.ceil(first / accumulate)} (in epoch {every_n_epochs}: "
                f"trainer.check_val_every_n_epoch={every_n_epochs}, data.iterations_per_epoch="
                f"{iterations_per_epoch}" + (f", trainer.val_check_interval={interval}" if interval else "") + ")")
    ends = [(int(value) * per_unit, key, value) for key, value, per_unit in
            (("trainer.max_epochs", get("max_epochs"), batches), ("trainer.max_steps", get("max_steps"), accumulate))
            if value not in (None, -1)]
    if not ends:
        return None
    last, key, value = min(ends)
    if first <= last:
        return None
    lower = "trainer.val_check_interval" if every_n_epochs is None else "trainer.check_val_every_n_epoch"
    if key == "trainer.max_epochs":
        advice = f"raise trainer.max_epochs to at least {math.ceil(first / batches)}, or lower {lower}"
    else:
        advice = (f"raise trainer.max_steps to at least {math.ceil(first / accumulate)}, or lower {lower}"
                  + ("" if every_n_epochs is None else " or data.iterations_per_epoch"))
    return (f"no validation would run: {key}={value} ends training after step {math.ceil(last / accumulate)}, "
            f"and the first validation comes {when}; {advice} (trainer.limit_val_batches=0 turns validation off "
            "on purpose)")
