"""An output folder of predictions: the output-folder guard (:mod:`pancreas_mtl.output_guard`) with one
record per case.

``.records/{case}.json`` is a case's record: written with ``status: writing`` before the case's files (so a
killed run still knows the half-written ones), and rewritten with ``status: finished`` and the files'
SHA-256 after them. ``.records/.run.json`` (the guard's folder record) holds what decides the predictions:
a digest of every network's weights, the plan, the inference settings, precision and postprocessing. A run
into a folder with another model or settings is refused (the tables would mix two models), or, with
``overwrite=true``, the folder's earlier predictions are removed first. Only files the records list with
the digest they still have are ever removed or replaced: a mask corrected by hand is kept, and its case is
not predicted again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pancreas_mtl.output_guard import RECORDS_DIR, OutputFolder, OutputFolderError, read_manifest

__all__ = ["OutputFolderError", "open_output_folder"]

log = logging.getLogger(__name__)

COMMAND = "predict"
SUBTYPE_RESULTS = "subtype_results.csv"
SUBTYPE_PROBABILITIES = "subtype_probabilities.csv"
TIMINGS = "timings.csv"
TABLES = (SUBTYPE_RESULTS, SUBTYPE_PROBABILITIES)
TABLES_UNIT, TIMINGS_UNIT = ".tables", ".timings"
MASK_SUFFIX = ".nii.gz"
WRITING, FINISHED = "writing", "finished"


def mask_name(case_id: str) -> str:
    return f"{case_id}{MASK_SUFFIX}"


def probabilities_name(case_id: str) -> str:
    return f"{case_id}.npz"


def case_files(case_id: str, save_probabilities: bool) -> list[str]:
    return [mask_name(case_id)] + ([probabilities_name(case_id)] if save_probabilities else [])


def record_path(output_dir: Path, case_id: str) -> Path:
    return Path(output_dir) / RECORDS_DIR / f"{case_id}.json"


def read_record(path: Path) -> dict | None:
    """A record, or None when it is missing or unreadable (a foreign or damaged file counts as no record)."""
    return read_manifest(Path(path))


def case_records(output_dir: str | Path) -> dict[str, dict]:
    """``{case_id: record}`` of every case record in the folder, finished or not."""
    units = OutputFolder(Path(output_dir), COMMAND).unit_records()
    return {unit: record for unit, record in units.items() if not unit.startswith(".")}


def is_finished(output_dir: Path, case_id: str, save_probabilities: bool) -> bool:
    record = read_record(record_path(output_dir, case_id))
    if record is None or record.get("status", FINISHED) != FINISHED:
        return False
    return all((Path(output_dir) / name).is_file() for name in case_files(case_id, save_probabilities))


def finished_records(output_dir: str | Path) -> list[dict]:
    """The records of every finished case in ``output_dir`` (whose mask exists), sorted by mask name."""
    output_dir = Path(output_dir)
    records = [record for record in case_records(output_dir).values()
               if record.get("status", FINISHED) == FINISHED and (output_dir / record.get("mask", "")).is_file()]
    return sorted(records, key=lambda r: r["mask"])


def mark_writing(folder: OutputFolder, case_id: str, files: Sequence[str]) -> None:
    """Record, before a case's files are written, that they are this tool's."""
    folder.record(case_id, pending=files, case_id=case_id, status=WRITING, mask=mask_name(case_id))


def mark_finished(folder: OutputFolder, record: dict) -> None:
    """The case's full record with its files' SHA-256; written last, so the case is finished once this exists."""
    fields = {key: value for key, value in record.items() if key not in ("files", "sha256")}
    folder.record(record["case_id"], record["files"], **{**fields, "status": FINISHED})


def open_output_folder(output_dir: str | Path, case_ids: Sequence[str], identity: Mapping, *, overwrite: bool,
                       save_probabilities: bool, reads: Iterable[str | Path] = ()) -> OutputFolder:
    """Check that predicting ``case_ids`` into ``output_dir`` with ``identity`` (what decides the predictions)
    replaces nothing this tool did not write, reads nothing it writes and mixes no two models, then record
    the identity (:meth:`OutputFolder.open`).

    Raises:
        OutputFolderError: see :meth:`pancreas_mtl.output_guard.OutputFolder.open`.
    """
    writes = [name for case_id in case_ids for name in case_files(case_id, save_probabilities)]
    return OutputFolder.open(output_dir, COMMAND, identity=identity, reads=reads,
                             writes=[*writes, *TABLES, TIMINGS], overwrite=overwrite)
