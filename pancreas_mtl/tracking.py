"""W&B run settings shared by training's logger and the commands that log a run of their own (crossval):
online when credentials are found, else offline into the run's folder (``wandb sync`` uploads it later)."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

WANDB_OFFLINE_MODES = ("offline", "dryrun", "disabled")


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


def log_summary_run(directory: str | Path, *, project: str, group: str | None, name: str, job_type: str,
                    config: Mapping, summary: Mapping[str, float | None], table: tuple[list[str], list[list]] | None = None,
                    offline: bool | str | None = "auto") -> Path:
    """One W&B run holding a command's result: ``config``, the ``summary`` scalars and an optional table
    (columns, rows), written under ``directory``/wandb; returns that folder."""
    import wandb

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mode = "offline" if resolve_wandb_offline(offline) else "online"
    run = wandb.init(project=project, group=group, name=name, job_type=job_type, dir=str(directory), mode=mode,
                     config=dict(config), reinit="finish_previous")
    try:
        run.summary.update({key: value for key, value in summary.items() if value is not None})
        if table is not None:
            columns, rows = table
            run.log({"per_case": wandb.Table(columns=list(columns), data=[list(row) for row in rows])})
    finally:
        run.finish()
    return directory / "wandb"
