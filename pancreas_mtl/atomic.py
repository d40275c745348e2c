"""Writing a file so that a reader never sees it half written, even if the process is killed."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (same folder, so the rename is atomic) ending in
    ``suffix`` (for writers that need an extension, e.g. ".npy", ".nii.gz"); write it in the block.
    On success it is renamed over ``path``; on any error it is removed and ``path`` is untouched, and the
    error raised is the write's own (a failing clean-up, e.g. in a read-only folder, never hides it).
    The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # nothing was written there, or the folder refuses changes: the cause is raised above
