"""The output-folder guard: every command that writes checks its folder here first and records what it wrote.

One rule for predict, evaluate, compare, holdout, crossval, tune, the notebook runner, generate, convert and
export: a command writes only into a new or empty folder, or into one holding this tool's record of what it
wrote there, and never into a folder holding a file the same run reads (its inputs, the ground truth, a
dataset's folders). Only a file the record lists with the SHA-256 it still has is ever replaced or removed
(``overwrite=true`` removes recorded files only); a recorded file changed since it was written (a mask
corrected by hand) is the user's: it is kept, with a warning naming it, and never written again.

The record takes one of two forms:

- ``.records/`` (:class:`OutputFolder`): ``.records/.run.json`` names the command that owns the folder and
  its identity (the inputs and settings that decide the outputs; a run with another identity is refused, or
  with ``overwrite=true`` the earlier outputs are removed first). Every other ``.records/{unit}.json`` is
  one unit of work (a predicted case, an evaluation's tables) listing its files with their SHA-256; a
  file listed before it was written (so a killed run still knows it) carries its unit's name.
- A manifest (:func:`write_manifest`: ``synthetic.json``, ``conversion.json``, a model folder's
  ``manifest.json``) for a dataset or model written as one piece: its file list, written before the
  first file, and their digests once written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from pancreas_mtl.config import config_differences
from pancreas_mtl.files import atomic_path, load_json, save_json, sha256

log = logging.getLogger(__name__)

TOOL = "pancreas_mtl"
RECORDS_DIR = ".records"
FOLDER_RECORD = ".run.json"  # hidden: no case id starts with a dot
LOCK_FILE = ".lock"
# a case's image as datasets name them: {case}_{channel:04d}{ending}
_CASE_IMAGE = re.compile(r"_\d{4}\.(nii\.gz|nii|nrrd|mha)$")
_SUBTYPE_FOLDER = re.compile(r"^subtype\d+$")
# a file killed between write and rename (files.atomic_path): ".{name}.{32 hex}.tmp{suffix}"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp[^/]*$")


class OutputFolderError(ValueError):
    """A folder this run may not write into: it holds files this tool did not write, files the run reads,
    a dataset, or the outputs of another command or of other inputs and settings."""


def describe_paths(paths: Sequence, shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 12 more``: the first few of a list of paths and its length."""
    paths = [str(path) for path in paths]
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more" if more > 0 else "")


# --- checks every command runs before it writes --------------------------------------------------------

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


def _is_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


# --- .records/: folders that commands write piece by piece -----------------------------------------

def _read(path: Path) -> dict | None:
    try:
        record = load_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class OutputFolder:
    """An output folder opened by :meth:`open`: what the run may write there, and its record."""

    def __init__(self, path: Path, command: str, identity: Mapping | None = None):
        self.path = Path(path)
        self.command = command
        self.identity = dict(identity or {})
        self.kept: set[str] = set()  # recorded files changed since they were written: the user's
        self.claimed = False

    @property
    def records(self) -> Path:
        return self.path / RECORDS_DIR

    def unit_path(self, unit: str) -> Path:
        return self.records / f"{unit}.json"

    # --- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, command: str, *, identity: Mapping | None = None,
             reads: Iterable[str | Path | None] = (), writes: Iterable[str] = (),
             overwrite: bool = False, claim: bool = True) -> "OutputFolder":
        """Check that ``command`` may write ``writes`` (relative paths) into ``path``, then record that it owns
        the folder with ``identity`` (:meth:`claim`; with ``claim=False`` at its first record, so a run
        refused after these checks leaves no folder behind).

        Raises:
            OutputFolderError: ``path`` is a file; it is or holds something this run ``reads``; it is a
                dataset's folder; it is not empty and holds no record of this tool; it holds the outputs
                of another command, or (without ``overwrite``) of another identity, naming the differences;
                or a file in ``writes`` exists and no record lists it (never replaced, overwrite or not).
        """
        identity = json.loads(json.dumps(dict(identity or {})))  # as stored: tuples become lists
        folder = cls(Path(path).expanduser(), command, identity)
        out = folder.path
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"output {out} is a file, expected a folder for the outputs of {command}")
        refuse_reads(out, reads)
        reason = dataset_folder_reason(out, folder.owned() if folder.records.is_dir() else ())
        if reason:
            raise OutputFolderError(f"output folder {out} is a dataset's folder ({reason}); {command} never "
                                    "writes among a dataset's files: write to a folder of its own")
        stored = _read(folder.records / FOLDER_RECORD)
        if out.is_dir() and stored is None:
            entries = sorted(entry.name for entry in out.iterdir())
            if (folder.records).is_dir():
                raise OutputFolderError(f"output folder {out} was written by an earlier version that recorded no "
                                        f"command, model or settings; write into a new folder")
            if entries:
                raise OutputFolderError(
                    f"output folder {out} holds {len(entries)} file(s) or folder(s) this tool did not write: "
                    f"{describe_paths(entries)}. {command} writes only into an empty or new folder, or into one "
                    f"holding its own record ({RECORDS_DIR}/): choose another folder, or move those files out")
        if stored is not None:
            if stored.get("command", command) != command:
                raise OutputFolderError(f"output folder {out} holds the outputs of {stored.get('command')}; "
                                        f"write the outputs of {command} to a folder of its own")
            differences = config_differences(identity, stored.get("identity", {}))
            if differences and not overwrite:
                raise OutputFolderError(
                    f"output folder {out} holds the outputs of {command} made with another model, inputs or "
                    "settings (this run "
                    "vs the folder):\n  " + "\n  ".join(differences[:8]) + "\nWrite into a new folder, or pass "
                    "overwrite=true to remove its earlier outputs (only the files its record lists)")
            if differences:
                log.warning("output folder %s: overwrite=true, removing %d file(s) of its earlier outputs", out,
                            folder.clear())
        owned, kept = folder.owned(), folder.acknowledged()
        foreign, changed = [], []
        for name in writes:
            target = out / name
            if not (target.exists() or target.is_symlink()):
                continue
            if name in kept:
                changed.append(name)
            elif name not in owned:
                foreign.append(target)
            elif owned[name] is not None and digest(target) != owned[name]:
                changed.append(name)
        if foreign:
            raise OutputFolderError(f"output folder {out} holds {len(foreign)} file(s) this run would replace that "
                                    f"this tool did not write: {describe_paths(foreign)}. They are never replaced "
                                    f"(overwrite=true neither); write into another folder")
        if claim or changed:
            folder.claim()
        for name in changed:
            folder.keep(name)
        return folder

    def claim(self) -> "OutputFolder":
        """Record (once) that this command owns the folder, with its identity; the folder is created."""
        if self.claimed:
            return self
        try:
            save_json({"tool": TOOL, "command": self.command, "identity": self.identity,
                       "written": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      self.records / FOLDER_RECORD)
        except OSError as error:
            raise OutputFolderError(f"output folder {self.path} is not writable: {error.strerror or error}") from None
        self.claimed = True
        return self

    # --- what the record says ----------------------------------------------------------------------

    def unit_records(self) -> dict[str, dict]:
        """``{unit: record}`` of every unit record in the folder (a damaged one counts as none, with a warning)."""
        units = {}
        for path in sorted(self.records.glob("*.json")) + sorted(self.records.glob(".*.json")):
            if path.name == FOLDER_RECORD or path.stem in units:
                continue
            record = _read(path)
            if record is None:
                log.warning("unreadable record %s ignored", path)
                continue
            units[path.stem] = record
        return units

    @staticmethod
    def unit_files(unit: str, record: Mapping) -> dict[str, str | None]:
        """``{file: SHA-256}`` a unit's record accounts for. A file listed before it was written (no digest
        yet) counts only when it carries the unit's name, so no record can claim a file of the user's."""
        digests = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
        files = {name: value for name, value in digests.items()
                 if isinstance(name, str) and isinstance(value, str) and _is_relative(name)}
        listed = record.get("files") if isinstance(record.get("files"), list) else []
        for name in listed:
            if isinstance(name, str) and name not in files and _is_relative(name) and name.startswith(f"{unit}."):
                files[name] = None
        return files

    def owned(self) -> dict[str, str | None]:
        """``{file: SHA-256 or None}`` of every file the folder's records list."""
        owned: dict[str, str | None] = {}
        for unit, record in self.unit_records().items():
            owned.update(self.unit_files(unit, record))
        return owned

    def acknowledged(self) -> set[str]:
        """Files the records know as the user's (changed after this tool wrote them)."""
        return {name for record in self.unit_records().values() for name in record.get("kept", [])
                if isinstance(name, str)}

    def may_write(self, name: str) -> bool:
        """False for a recorded file the user changed: it is theirs now."""
        return name not in self.kept

    def changed(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, the existing files whose bytes differ from their recorded SHA-256, or that the
        records already know as the user's."""
        owned, kept = self.owned(), self.acknowledged()
        found = []
        for name in names:
            path = self.path / name
            if not (path.is_file() or path.is_symlink()):
                continue
            if name in kept or (owned.get(name) is not None and digest(path) != owned[name]):
                found.append(name)
        return found

    # --- writing the record ------------------------------------------------------------------------

    def record(self, unit: str, files: Iterable[str] = (), *, pending: Iterable[str] = (), **fields) -> Path:
        """The record of ``unit``: ``files`` (written already, relative to the folder) with their SHA-256,
        ``pending`` files about to be written (named after the unit), and ``fields``. Written atomically."""
        self.claim()
        names = [name for name in files if self.may_write(name)]
        digests = {name: digest(self.path / name) for name in names
                   if (self.path / name).is_file() or (self.path / name).is_symlink()}
        listed = [*names, *(name for name in pending if name not in names)]
        return save_json({**fields, "files": listed, "sha256": digests}, self.unit_path(unit))

    def keep(self, name: str) -> None:
        """``name`` is the user's now: warn once, never write or remove it, and say so in the records."""
        if name in self.kept:
            return
        self.kept.add(name)
        log.warning("%s was changed after %s wrote it (edited by hand?): it is kept as it is, and not written "
                    "again", self.path / name, self.command)
        path = self.unit_path(".kept")
        with self.lock():
            record = _read(path) or {}
            save_json({"kept": sorted({*record.get("kept", []), name})}, path)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock (several processes may predict into one folder): for shared files such
        as tables and their records."""
        self.records.mkdir(parents=True, exist_ok=True)
        with open(self.records / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- removing ----------------------------------------------------------------------------------

    def remove_unit(self, unit: str) -> list[str]:
        """Remove the files of ``unit`` that are unchanged, and its record; the changed ones are kept (and
        returned)."""
        record = _read(self.unit_path(unit))
        kept = []
        if record is not None:
            for name, recorded in self.unit_files(unit, record).items():
                path = self.path / name
                if not path.is_file() and not path.is_symlink():
                    continue
                if recorded is not None and digest(path) != recorded:
                    self.keep(name)
                    kept.append(name)
                else:
                    path.unlink(missing_ok=True)
        self.unit_path(unit).unlink(missing_ok=True)
        return kept

    def clear(self) -> int:
        """Remove every unchanged file the records list, and those records; the number of files removed.
        Changed files and anything the records do not list stay."""
        removed = 0
        for unit in self.unit_records():
            if unit == ".kept":
                continue
            record = _read(self.unit_path(unit)) or {}
            files = self.unit_files(unit, record)
            present = sum((self.path / name).is_file() for name in files)
            removed += present - len(self.remove_unit(unit))
        return removed


# --- manifests: a dataset or a model written as one piece --------------------------------------------

def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest`` as JSON atomically: a reader sees the previous version or this one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``; None when there is none or it cannot be read as a JSON object (a folder
    whose manifest is unreadable counts as one the tool did not write)."""
    return _read(path)


def listed_files(manifest: dict) -> list[str] | None:
    """The manifest's relative file paths, or None when it has no valid list (an older format)."""
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and _is_relative(f) for f in files):
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
