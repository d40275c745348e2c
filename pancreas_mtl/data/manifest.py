"""The list of files a dataset tool wrote into a folder: only those are ever replaced or removed.

The generator (``synthetic.json``) and the converter (``conversion.json``) write their manifest
before the first file it names, so a killed run still knows what it may have left. Anything else in
the folder is foreign: a folder holding a foreign entry is never written into or cleaned, with or
without ``overwrite``, and the error names the folder and the foreign entries.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from pancreas_mtl.files import atomic_path

# A file killed between write and rename (``atomic.atomic_path``): ".{name}.{32 hex}.tmp{suffix}".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp[^/]*$")


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest`` as JSON atomically: a reader sees the previous version or this one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``; None when there is none or it cannot be read as a JSON object with
    a file list (a folder whose manifest is unreadable counts as one the tool did not write)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def listed_files(manifest: dict) -> list[str] | None:
    """The manifest's relative file paths, or None when it has no valid list (an older format)."""
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and _is_relative(f) for f in files):
        return None
    return files


def _is_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def _owned_folders(files: Iterable[str]) -> set[str]:
    return {parent.as_posix() for f in files for parent in PurePosixPath(f).parents[:-1]}


def foreign_entries(root: Path, files: Iterable[str], manifest_name: str) -> list[str]:
    """Every entry under ``root`` (relative POSIX paths, sorted) that is not a listed file, a folder
    holding one, the manifest, or a temporary file left beside one of them by a killed write.
    Symbolic links are not followed; an unlisted link is foreign."""
    owned = {*files, manifest_name}
    folders = _owned_folders(owned)
    foreign = []
    if not root.is_dir():
        return [] if not root.exists() else ["."]
    for current, dirnames, filenames in os.walk(root):
        here = Path(current)
        for name in [*dirnames, *filenames]:
            path = here / name
            relative = path.relative_to(root).as_posix()
            if path.is_dir() and not path.is_symlink():
                if relative not in folders and not any(path.iterdir()):
                    foreign.append(relative + "/")  # an empty folder it did not make
                continue
            if relative in owned:
                continue
            temporary = _TEMPORARY.match(name)
            if temporary and (PurePosixPath(relative).parent / temporary["name"]).as_posix() in owned:
                continue
            foreign.append(relative)
    return sorted(foreign)


def describe_paths(paths: list[str], shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 12 more``: the first few of a list of paths and its length."""
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more" if more > 0 else "")


def remove_listed(root: Path, files: Iterable[str], manifest_name: str) -> None:
    """Remove the listed files (and the temporary files of killed writes beside them), then the
    folders that held them, deepest first, where they are left empty. Nothing else is touched;
    the manifest itself stays until the caller replaces it."""
    files = [f for f in files if f != manifest_name]
    for relative in files:
        path = root / relative
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        parent = path.parent
        if parent.is_dir() and not parent.is_symlink():
            for leftover in parent.iterdir():
                match = _TEMPORARY.match(leftover.name)
                if match and match["name"] == path.name and (leftover.is_file() or leftover.is_symlink()):
                    leftover.unlink(missing_ok=True)
    for folder in sorted(_owned_folders(files), key=lambda f: f.count("/"), reverse=True):
        path = root / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            try:
                path.rmdir()
            except OSError:  # filled or removed meanwhile by a concurrent run: left as it is
                pass
