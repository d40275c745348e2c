"""Manifests: the file list (with digests) of a dataset or a model folder written as one piece
(``synthetic.json``, ``conversion.json``, a model folder's ``manifest.json``), written before the first file."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from pancreas_mtl.files import atomic_path, sha256
from pancreas_mtl.output_guard.checks import is_relative, read_json_object

log = logging.getLogger(__name__)

# a file killed between write and rename (files.atomic_path): ".{name}.{32 hex}.tmp{suffix}"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp[^/]*$")


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest`` as JSON atomically: a reader sees the previous version or this one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``; None when there is none or it cannot be read as a JSON object (a folder
    whose manifest is unreadable counts as one the tool did not write)."""
    return read_json_object(path)


def listed_files(manifest: dict) -> list[str] | None:
    """The manifest's relative file paths, or None when it has no valid list (an older format)."""
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and is_relative(f) for f in files):
        return None
    return files


def file_digests(root: Path, files: Iterable[str]) -> dict[str, str]:
    """``{file: SHA-256}`` of the listed regular files under ``root`` (links and missing files left out)."""
    return {name: sha256(root / name) for name in files
            if (root / name).is_file() and not (root / name).is_symlink()}


def changed_files(root: Path, digests: Mapping[str, str] | None) -> list[str]:
    """The files under ``root`` whose bytes differ from their recorded SHA-256 (changed since written)."""
    return sorted(name for name, digest in (digests or {}).items()
                  if isinstance(digest, str) and (root / name).is_file() and not (root / name).is_symlink()
                  and sha256(root / name) != digest)


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


def remove_listed(root: Path, files: Iterable[str], manifest_name: str,
                  digests: Mapping[str, str] | None = None) -> list[str]:
    """Remove the listed files (and the temporary files of killed writes beside them), then the folders
    that held them, deepest first, where they are left empty; returns the files kept. A file whose
    SHA-256 differs from ``digests`` (changed since it was written) is the user's: kept, with a warning.
    Nothing else is touched; the manifest itself stays until the caller replaces it."""
    digests = dict(digests or {})
    files = [f for f in files if f != manifest_name]
    kept = []
    for relative in files:
        path = root / relative
        if relative in digests and path.is_file() and not path.is_symlink() and sha256(path) != digests[relative]:
            log.warning("%s was changed after this tool wrote it (edited by hand?): it is kept as it is", path)
            kept.append(relative)
            continue
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
    return kept
