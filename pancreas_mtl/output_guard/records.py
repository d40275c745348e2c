"""``.records/``: the record of an output folder that a command writes piece by piece (predicted cases,
an evaluation's tables), and the folder's claim by one command and identity."""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pancreas_mtl.config import config_differences
from pancreas_mtl.files import save_json
from pancreas_mtl.output_guard.checks import (
    OutputFolderError,
    dataset_folder_reason,
    describe_paths,
    digest,
    is_relative,
    read_json_object,
    refuse_reads,
)

log = logging.getLogger(__name__)

TOOL = "pancreas_mtl"
RECORDS_DIR = ".records"
FOLDER_RECORD = ".run.json"  # hidden: no case id starts with a dot
LOCK_FILE = ".lock"
KEPT_UNIT = ".kept"  # the record of files the user changed after this tool wrote them


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
        units = folder.unit_records()  # read once: a folder of predictions holds one record per case
        owned, kept = folder.owned(units), folder.acknowledged(units)
        reason = dataset_folder_reason(out, owned)
        if reason:
            raise OutputFolderError(f"output folder {out} is a dataset's folder ({reason}); {command} never "
                                    "writes among a dataset's files: write to a folder of its own")
        stored = read_json_object(folder.records / FOLDER_RECORD)
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
                    "settings (this run vs the folder):\n  " + "\n  ".join(differences[:8])
                    + "\nWrite into a new folder, or pass overwrite=true to remove its earlier outputs (only the "
                    "files its record lists)")
            if differences:
                log.warning("output folder %s: overwrite=true, removing %d file(s) of its earlier outputs", out,
                            folder.clear())
                units = folder.unit_records()
                owned, kept = folder.owned(units), folder.acknowledged(units)
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
        for path in sorted(self.records.glob("*.json")):  # pathlib's * matches the hidden (folder) records too
            if path.name == FOLDER_RECORD:
                continue
            record = read_json_object(path)
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
                 if isinstance(name, str) and isinstance(value, str) and is_relative(name)}
        listed = record.get("files") if isinstance(record.get("files"), list) else []
        for name in listed:
            if isinstance(name, str) and name not in files and is_relative(name) and name.startswith(f"{unit}."):
                files[name] = None
        return files

    def owned(self, units: Mapping[str, dict] | None = None) -> dict[str, str | None]:
        """``{file: SHA-256 or None}`` of every file the folder's records (``units``, read if not given) list."""
        owned: dict[str, str | None] = {}
        for unit, record in (self.unit_records() if units is None else units).items():
            owned.update(self.unit_files(unit, record))
        return owned

    def acknowledged(self, units: Mapping[str, dict] | None = None) -> set[str]:
        """Files the records know as the user's (changed after this tool wrote them: :meth:`keep`)."""
        record = (self.unit_records() if units is None else units).get(KEPT_UNIT, {})
        return {name for name in record.get("kept", []) if isinstance(name, str)}

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
        path = self.unit_path(KEPT_UNIT)
        with self.lock():
            record = read_json_object(path) or {}
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

    @contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """Hold the folder's lock ``name`` if no other process holds it: yields True while held, False at
        once when another process has it (work that one process should do, such as a study's retrain).
        The system frees it when its holder dies."""
        self.records.mkdir(parents=True, exist_ok=True)
        with open(self.records / f".{name}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- removing ----------------------------------------------------------------------------------

    def remove_unit(self, unit: str) -> list[str]:
        """Remove the files of ``unit`` that are unchanged, and its record; the changed ones are kept (and
        returned)."""
        record = read_json_object(self.unit_path(unit))
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
            if unit == KEPT_UNIT:
                continue
            record = read_json_object(self.unit_path(unit)) or {}
            files = self.unit_files(unit, record)
            present = sum((self.path / name).is_file() for name in files)
            removed += present - len(self.remove_unit(unit))
        return removed
