"""Finding the cases to predict: a dataset folder in either layout, a folder of images, or single files.

Accepted inputs (one, or a list mixing them):

- a dataset root in the distributed or nnU-Net raw layout (``pancreas_mtl.data.layout.discover``): its
  cases of the chosen splits (all by default); masks are ignored;
- a folder of images ``{case}_{XXXX}.nii.gz`` (XXXX the 4-digit channel; several channels make one
  multi-channel case), including a split folder of the distributed layout whose images sit in
  ``subtype{k}/`` subfolders; files without a channel number beside channel files are masks and are
  ignored, and a folder with no channel files at all holds one single-channel case per file;
- image files, named either way.

Structural problems (a missing channel, a case found twice) are returned per case, so that case fails
alone and the others are still predicted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pancreas_mtl.data.io import image_suffix, strip_suffix
from pancreas_mtl.data.layout import SPLITS, Case, discover

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SUBTYPE_FOLDER = re.compile(r"^subtype\d+$")


def is_dataset_root(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() or any((folder / split).is_dir() for split in SPLITS)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))


def _folder_images(folder: Path) -> list[Path]:
    """Image files of a folder, with those of its ``subtype{k}`` subfolders (a distributed split folder)."""
    files = _image_files(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _SUBTYPE_FOLDER.match(p.name)):
        files.extend(_image_files(sub))
    return files


def _cases_from_files(files: Sequence[Path], drop_unnumbered: bool) -> tuple[list[Case], dict[str, str]]:
    """Group image files into cases by name; ``drop_unnumbered``: ignore files without a channel number
    when channel files are present (masks beside images)."""
    channels: dict[str, dict[int, Path]] = defaultdict(dict)
    problems: dict[str, str] = {}
    numbered = [p for p in files if _CHANNEL_FILE.match(strip_suffix(p))]
    for path in files:
        match = _CHANNEL_FILE.match(strip_suffix(path))
        if match is None:
            if drop_unnumbered and numbered:
                continue
            case_id, channel = strip_suffix(path), 0
        else:
            case_id, channel = match["case"], int(match["channel"])
        if channel in channels[case_id]:
            problems[case_id] = (f"two files for channel {channel}: {channels[case_id][channel]} and {path}")
        channels[case_id][channel] = path
    cases = []
    for case_id, found in sorted(channels.items()):
        expected = list(range(max(found) + 1))
        missing = [c for c in expected if c not in found]
        if missing:
            problems.setdefault(case_id, f"channel file(s) {', '.join(f'{c:04d}' for c in missing)} missing "
                                         f"(found {', '.join(p.name for _, p in sorted(found.items()))})")
            continue
        cases.append(Case(case_id, tuple(found[c] for c in expected), None, None, "test"))
    return cases, problems


def find_cases(inputs: str | Path | Sequence[str | Path], splits: Sequence[str] | None = None
               ) -> tuple[list[Case], dict[str, str]]:
    """The cases to predict (sorted by id, without masks) and ``{case_id: problem}`` for cases that cannot be.

    Args:
        inputs: a path or a list of paths (see the module docstring).
        splits: for a dataset root, the splits to predict ("train", "validation", "test"); None: all.

    Raises FileNotFoundError for a path that does not exist, ValueError when nothing is found, and
    ``DatasetError`` when a dataset root does not pass discovery.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input given")
    cases: dict[str, Case] = {}
    problems: dict[str, str] = {}
    loose_files: list[Path] = []
    for path in paths:
        path = path.expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {path} not found")
        found: list[Case] = []
        if path.is_dir() and is_dataset_root(path):
            index = discover(path)
            unknown = sorted(set(splits or ()) - set(SPLITS))
            if unknown:
                raise ValueError(f"unknown split(s) {unknown}; expected some of {list(SPLITS)}")
            found = [Case(c.case_id, c.image_paths, None, c.subtype, c.split) for c in index.cases
                     if splits is None or c.split in splits]
        elif path.is_dir():
            found, folder_problems = _cases_from_files(_folder_images(path), drop_unnumbered=True)
            problems.update(folder_problems)
        elif image_suffix(path):
            loose_files.append(path)
            continue
        else:
            raise ValueError(f"input {path}: not an image file (.nii.gz, .nii, .nrrd, .mha) or a folder")
        _add(cases, problems, found)
    if loose_files:
        found, file_problems = _cases_from_files(loose_files, drop_unnumbered=False)
        problems.update(file_problems)
        _add(cases, problems, found)
    if not cases and not problems:
        raise ValueError(f"no images found in {', '.join(str(p) for p in paths)}")
    return [cases[c] for c in sorted(cases) if c not in problems], problems


def _add(cases: dict[str, Case], problems: dict[str, str], found: list[Case]) -> None:
    for case in found:
        if case.case_id in cases:
            problems[case.case_id] = (f"case found twice: {cases[case.case_id].image_paths[0]} and "
                                      f"{case.image_paths[0]}")
            continue
        cases[case.case_id] = case

