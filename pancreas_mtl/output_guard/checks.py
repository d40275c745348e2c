"""Checks every command runs before it writes into a folder, and the error they raise."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path, PurePosixPath

from pancreas_mtl.files import load_json, sha256

# a case's image as datasets name them: {case}_{channel:04d}{ending}
_CASE_IMAGE = re.compile(r"_\d{4}\.(nii\.gz|nii|nrrd|mha)$")
_SUBTYPE_FOLDER = re.compile(r"^subtype\d+$")


class OutputFolderError(ValueError):
    """A folder this run may not write into: it holds files this tool did not write, files the run reads,
    a dataset, or the outputs of another command or of other inputs and settings."""


def describe_paths(paths: Sequence, shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 12 more``: the first few of a list of paths and its length."""
    paths = [str(path) for path in paths]
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more" if more > 0 else "")


def refuse_reads(out: Path, reads: Iterable[str | Path | None]) -> None:
    """Refuse ``out`` when it is, or holds, a file or folder the same run reads.

    Raises:
        OutputFolderError: naming the folder and what it holds.
    """
    target = Path(out).expanduser().resolve()
    for read in reads:
        if read is None:
            continue
        source = Path(read).expanduser().resolve()
        if source == target or target in source.parents:
            raise OutputFolderError(f"output folder {out} {'is' if source == target else 'holds'} {read}, which "
                                    "this run reads; write to a folder of its own")


def dataset_folder_reason(out: Path, ours: Collection[str] = ()) -> str | None:
    """Why ``out`` is a dataset's folder (the tool never writes there), or None; files in ``ours`` (this
    tool's record lists them: a case named ``x_0001`` has the mask ``x_0001.nii.gz``) do not count."""
    out = Path(out).expanduser()
    if _SUBTYPE_FOLDER.match(out.name) and out.parent.name in ("train", "validation"):
        return f"a subtype folder of a dataset's {out.parent.name}/ split"
    if not out.is_dir():
        return None
    if (out / "dataset.json").is_file() or (out / "imagesTr").is_dir():
        return "an nnU-Net raw dataset: dataset.json or imagesTr/"
    images = sorted(entry.name for entry in out.iterdir() if _CASE_IMAGE.search(entry.name) and entry.name not in ours)
    if images:
        return f"it holds case images such as {images[0]}"
    if any(entry.is_dir() and _SUBTYPE_FOLDER.match(entry.name) for entry in out.iterdir()):
        return "a dataset's split folder, holding subtype folders"
    return None


def digest(path: Path) -> str:
    """What a record keeps of a file: its SHA-256, or ``link:<target>`` for a symbolic link."""
    return f"link:{os.readlink(path)}" if path.is_symlink() else sha256(path)


def is_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def read_json_object(path: Path) -> dict | None:
    """A JSON object read from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        record = load_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
