"""W&B run settings shared by training's logger and the commands that log a run of their own (predict,
evaluate, crossval): online when credentials are found, else offline into the run's folder (``wandb sync``
uploads it later); and the tables and plots those runs log, built from plain values."""

from __future__ import annotations

import logging
import math
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch

log = logging.getLogger(__name__)

WANDB_OFFLINE_MODES = ("offline", "dryrun", "disabled")
# checkpoint["wandb"]: the reference (run_reference) of the W&B run that trained the checkpoint, written by
# monitoring.WandbArtifacts; predict.py and evaluate record it as train_run_id
CHECKPOINT_KEY = "wandb"
# what W&B makes its run ids of; an id read back from a file is used only when it is one (wandb.init
# refuses others with a UsageError, which would stop the training resumed from that checkpoint)
RUN_ID = re.compile(r"[A-Za-z0-9_-]+")


def valid_run_id(run_id) -> bool:
    """Whether ``run_id`` is a W&B run id: letters, digits, ``-`` and ``_``."""
    return isinstance(run_id, str) and RUN_ID.fullmatch(run_id) is not None


def wandb_credentials_available() -> bool:
    """Whether ``wandb.init`` can authenticate: ``WANDB_API_KEY`` or an identity token file is set, or the
    netrc file (``NETRC``, else ``~/.netrc``) has an entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_offline(requested: bool | str | None) -> bool:
    """The W&B logger's ``offline`` flag: an explicit true/false is kept; ``auto`` (or null) is offline
    when ``WANDB_MODE`` says so or when no credentials are found, online otherwise."""
    if isinstance(requested, bool):
        return requested
    if requested not in (None, "auto"):
        raise ValueError(f"logger offline must be true, false or auto, got {requested!r}")
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE_MODES:
        return True
    if wandb_credentials_available():
        return False
    log.warning("W&B: no API key (WANDB_API_KEY unset, no `wandb login`); logging offline. "
                "Upload later with `wandb sync <run folder>/wandb/offline-run-*`")
    return True


# --- W&B runs of the commands, and their tables and plots --------------------------------------------

def start_run(directory: str | Path, *, project: str, group: str | None, name: str, job_type: str,
              config: Mapping, offline: bool | str | None = "auto"):
    """A W&B run writing under ``directory``/wandb (offline there without credentials); the caller finishes it."""
    import wandb

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mode = "offline" if resolve_wandb_offline(offline) else "online"
    return wandb.init(project=project, group=group, name=name, job_type=job_type, dir=str(directory), mode=mode,
                      config=dict(config), reinit="finish_previous")


def log_summary_run(directory: str | Path, *, project: str, group: str | None, name: str, job_type: str,
                    config: Mapping, summary: Mapping[str, float | None], table: tuple[list[str], list[list]] | None = None,
                    offline: bool | str | None = "auto") -> Path:
    """One W&B run holding a command's result: ``config``, the ``summary`` scalars and an optional table
    (columns, rows), written under ``directory``/wandb; returns that folder."""
    run = start_run(directory, project=project, group=group, name=name, job_type=job_type, config=config,
                    offline=offline)
    try:
        run.summary.update({key: value for key, value in summary.items() if value is not None})
        if table is not None:
            run.log({"per_case": wandb_table(*table)})
    finally:
        run.finish()
    return Path(directory) / "wandb"


def wandb_table(columns: Sequence[str], rows: Sequence[Sequence]):
    """A ``wandb.Table``; NaN and infinite floats become None (W&B's JSON has no NaN)."""
    import wandb

    def cell(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value

    return wandb.Table(columns=list(columns), data=[[cell(value) for value in row] for row in rows])


def confusion_plot(matrix, class_names: Sequence[str], title: str = "subtype confusion matrix"):
    """W&B's interactive confusion matrix of a (K, K) count matrix (rows reference, columns predicted)."""
    import wandb

    k = len(class_names)
    counts = [[int(matrix[t][p]) for p in range(k)] for t in range(k)]
    y_true = [t for t in range(k) for p in range(k) for _ in range(counts[t][p])]
    y_pred = [p for t in range(k) for p in range(k) for _ in range(counts[t][p])]
    return wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred, class_names=list(class_names), title=title)


def roc_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "one-vs-rest ROC"):
    """W&B's ROC chart (the one ``wandb.plot.roc_curve`` draws, which needs pandas and scikit-learn) from
    ``{class name: (false positive rates, true positive rates)}`` computed by the caller."""
    import wandb

    rows = [[name, round(float(fpr), 4), round(float(tpr), 4)]
            for name, (fprs, tprs) in curves.items() for fpr, tpr in zip(fprs, tprs)]
    return wandb.plot_table("wandb/area-under-curve/v0", wandb.Table(columns=["class", "fpr", "tpr"], data=rows),
                            {"x": "fpr", "y": "tpr", "class": "class"},
                            {"title": title, "x-axis-title": "False positive rate",
                             "y-axis-title": "True positive rate"})


def run_reference(run) -> dict[str, str | None]:
    """What a later run needs to point at a W&B run: its id, project, entity, group and name."""
    return {"id": run.id, "project": run.project, "entity": getattr(run, "entity", None) or None,
            "group": run.group or None, "name": run.name, "config_artifact": config_artifact_name(run.id)}


def config_artifact_name(run_id: str) -> str:
    """The artifact of a training run holding its plan and resolved config."""
    return f"config-{run_id}"


def training_runs(checkpoints: Sequence[str | Path]) -> list[dict]:
    """The W&B reference each checkpoint carries, in order; checkpoints without one (trained without W&B,
    or before runs were recorded), no longer readable, or whose id is not a W&B run id (a warning names
    the checkpoint; training resumed from it starts a new W&B run) are left out. Reads the file
    memory-mapped, so the weights are not loaded."""
    references = []
    for path in checkpoints:
        try:
            saved = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - the link is a convenience
            log.info("W&B: no training run read from %s (%s)", path, error)
            continue
        reference = saved.get(CHECKPOINT_KEY) if isinstance(saved, Mapping) else None
        if isinstance(reference, Mapping) and reference.get("id"):
            if not valid_run_id(reference["id"]):
                log.warning("W&B: %s: checkpoint[%r] names the run id %r, expected letters, digits, - and _ only; "
                            "it is ignored (no link to that run; training resumed from the checkpoint starts a "
                            "new W&B run)", path, CHECKPOINT_KEY, reference["id"])
                continue
            references.append(dict(reference))
    return references
