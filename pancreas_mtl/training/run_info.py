"""What a run folder records so the run can be repeated: package version, git commit, machine (and its
W&B run, added once the run has one)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

import pancreas_mtl
from pancreas_mtl.files import load_json, save_json

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The source tree's commit, with ``-dirty`` when it has uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_run_info(run_dir: Path) -> Path:
    info = {
        "pancreas_mtl_version": pancreas_mtl.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "command": sys.argv,
    }
    return save_json(info, Path(run_dir) / "run_info.json")


def update_run_info(run_dir: Path, **entries) -> Path | None:
    """Add ``entries`` (e.g. the run's W&B reference) to the run folder's ``run_info.json``; None, writing
    nothing, where the folder has none (a run not started by train.py)."""
    path = Path(run_dir) / "run_info.json"
    if not path.is_file():
        return None
    return save_json({**load_json(path), **entries}, path)
