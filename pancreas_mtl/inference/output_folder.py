"""An output folder of predictions and its records: which files this tool wrote there, and with what.

``.records/{case}.json`` is a case's record: written with ``status: writing`` before the case's files,
and rewritten with ``status: finished`` after them, so a file without a record was not written by this
tool (it may be the user's ground truth), and a record that is still ``writing`` marks files a killed
run left half done. ``.records/.run.json`` is the folder's record: what decides its predictions (a
digest of every network's weights, the plan, the inference settings, precision and postprocessing).
A run into a folder with another model or settings is refused (the tables would mix two models),
or, with ``overwrite=true``, the folder's earlier predictions are removed first; only files its
records list are ever removed or replaced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pancreas_mtl.files import load_json, save_json
from pancreas_mtl.inference.checkpoint import config_differences

log = logging.getLogger(__name__)

RECORDS_DIR = ".records"
RUN_RECORD = ".run.json"  # hidden: no case id starts with a dot (inputs named so are skipped)
SUBTYPE_RESULTS = "subtype_results.csv"
SUBTYPE_PROBABILITIES = "subtype_probabilities.csv"
TIMINGS = "timings.csv"
TABLES = (SUBTYPE_RESULTS, SUBTYPE_PROBABILITIES, TIMINGS)
MASK_SUFFIX = ".nii.gz"
WRITING, FINISHED = "writing", "finished"


class OutputFolderError(ValueError):
    """The output folder holds files this tool did not write, or predictions of another model."""


def mask_name(case_id: str) -> str:
    return f"{case_id}{MASK_SUFFIX}"


def probabilities_name(case_id: str) -> str:
    return f"{case_id}.npz"


def record_path(output_dir: Path, case_id: str) -> Path:
    return Path(output_dir) / RECORDS_DIR / f"{case_id}.json"


def read_record(path: Path) -> dict | None:
    """A record, or None when it is missing or unreadable (a foreign or damaged file counts as no record)."""
    try:
        record = load_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def case_records(output_dir: str | Path) -> dict[str, dict]:
    """``{case_id: record}`` of every case record in the folder, finished or not."""
    records = {}
    for path in sorted((Path(output_dir) / RECORDS_DIR).glob("*.json")):
        if path.name.startswith("."):
            continue
        record = read_record(path)
        if record is None:
            log.warning("unreadable record %s ignored", path)
            continue
        records[path.stem] = record
    return records


def written_files(output_dir: Path, case_id: str, record: Mapping) -> list[Path]:
    """The files a case record says this tool wrote: its mask, and its probabilities when saved. Only those
    two names count, whatever else a (damaged or edited) record lists, so nothing else is ever removed."""
    own = (mask_name(case_id), probabilities_name(case_id))
    names = record.get("files") or list(own)
    return [output_dir / name for name in own if name in names]


def is_finished(output_dir: Path, case_id: str, save_probabilities: bool) -> bool:
    record = read_record(record_path(output_dir, case_id))
    if record is None or record.get("status", FINISHED) != FINISHED:
        return False
    files = [output_dir / mask_name(case_id)] + ([output_dir / probabilities_name(case_id)] if save_probabilities else [])
    return all(path.is_file() for path in files)


def finished_records(output_dir: str | Path) -> list[dict]:
    """The records of every finished case in ``output_dir`` (whose mask exists), sorted by mask name."""
    output_dir = Path(output_dir)
    records = [record for record in case_records(output_dir).values()
               if record.get("status", FINISHED) == FINISHED and (output_dir / record.get("mask", "")).is_file()]
    return sorted(records, key=lambda r: r["mask"])


def mark_writing(output_dir: Path, case_id: str, files: Sequence[str]) -> None:
    """Record, before a case's files are written, that they are this tool's."""
    save_json({"case_id": case_id, "status": WRITING, "mask": mask_name(case_id), "files": list(files)},
              record_path(output_dir, case_id))


def mark_finished(output_dir: Path, record: dict) -> None:
    """The case's full record; written last, so the case is finished once this exists."""
    save_json({**record, "status": FINISHED}, record_path(output_dir, record["case_id"]))


def foreign_files(output_dir: Path, case_ids: Sequence[str], save_probabilities: bool) -> list[Path]:
    """Files this run would write over that no record of this tool accounts for."""
    records = case_records(output_dir)
    foreign = []
    for case_id in case_ids:
        ours = {path.name for path in written_files(output_dir, case_id, records[case_id])} if case_id in records \
            else set()
        names = [mask_name(case_id)] + ([probabilities_name(case_id)] if save_probabilities else [])
        foreign += [output_dir / name for name in names if (output_dir / name).exists() and name not in ours]
    if not (output_dir / RECORDS_DIR).is_dir():
        foreign += [output_dir / name for name in TABLES if (output_dir / name).exists()]
    return foreign


def clear_predictions(output_dir: Path) -> int:
    """Remove every file the folder's records say this tool wrote (cases, tables, records); the number of
    files removed. Anything else in the folder stays."""
    removed = 0
    for case_id, record in case_records(output_dir).items():
        for path in [*written_files(output_dir, case_id, record), record_path(output_dir, case_id)]:
            if path.is_file():
                path.unlink()
                removed += 1
    for path in [*(output_dir / name for name in TABLES), output_dir / RECORDS_DIR / RUN_RECORD]:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def _describe(files: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(path) for path in files[:limit])
    return shown + (f" (and {len(files) - limit} more)" if len(files) > limit else "")


def open_output_folder(output_dir: str | Path, case_ids: Sequence[str], identity: Mapping, *, overwrite: bool,
                       save_probabilities: bool) -> Path:
    """Check that predicting ``case_ids`` into ``output_dir`` with ``identity`` (what decides the predictions)
    replaces nothing this tool did not write and mixes no two models, then record the identity.

    Raises:
        OutputFolderError: the folder holds files this run would replace that are not this tool's (naming
            them), or predictions made with another model or settings (naming the differences) and
            ``overwrite`` is false.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output {output_dir} is a file, expected a folder for the predictions")
    run_record = output_dir / RECORDS_DIR / RUN_RECORD
    stored = read_record(run_record) if run_record.exists() else None
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    if stored is not None or (output_dir / RECORDS_DIR).is_dir():
        differences = config_differences(identity, (stored or {}).get("identity", {}))
        if differences and not overwrite:
            what = ("was written by an earlier version that recorded no model or settings" if stored is None
                    else "holds predictions of another model or settings (this run vs the folder):\n  "
                    + "\n  ".join(differences[:8]))
            raise OutputFolderError(f"output folder {output_dir} {what}\nPredict into a new folder, or pass "
                                    "overwrite=true to remove its earlier predictions and redo them with this run's")
        if differences:
            log.warning("output folder %s: overwrite=true, removing %d file(s) of its earlier predictions",
                        output_dir, clear_predictions(output_dir))
    foreign = foreign_files(output_dir, case_ids, save_probabilities)
    if foreign:
        raise OutputFolderError(f"output folder {output_dir} holds {len(foreign)} file(s) this run would replace "
                                f"that this tool did not write: {_describe(foreign)}. They are never replaced "
                                "(overwrite=true neither); predict into another folder")
    try:
        save_json({"tool": "pancreas_mtl", "identity": identity,
                   "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}, run_record)
    except OSError as error:
        raise OutputFolderError(f"output folder {output_dir} is not writable: {error.strerror or error}") from None
    return output_dir
