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

from pancreas_mtl.output_guard.checks import (
    OutputFolderError,
    dataset_folder_reason,
    describe_paths,
    digest,
    refuse_reads,
)
from pancreas_mtl.output_guard.manifests import (
    changed_files,
    file_digests,
    foreign_entries,
    listed_files,
    read_manifest,
    remove_listed,
    write_manifest,
)
from pancreas_mtl.output_guard.records import FOLDER_RECORD, RECORDS_DIR, OutputFolder

__all__ = ["FOLDER_RECORD", "RECORDS_DIR", "OutputFolder", "OutputFolderError", "changed_files", "dataset_folder_reason",
           "describe_paths", "digest", "file_digests", "foreign_entries", "listed_files", "read_manifest",
           "refuse_reads", "remove_listed", "write_manifest"]
