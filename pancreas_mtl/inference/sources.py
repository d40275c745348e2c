"""Finding the cases to predict: a dataset folder in either layout, a folder of images, or single files.

Accepted inputs (one, or a list mixing them):

- a dataset root in the distributed or nnU-Net raw layout (``pancreas_mtl.raw.layout.discover``): its
  cases of the chosen splits (all by default); masks are ignored;
- a folder of images ``{case}_{XXXX}.nii.gz`` (XXXX the 4-digit channel; several channels make one
  multi-channel case), including a split folder of the distributed layout whose images sit in
  ``subtype{k}/`` subfolders; a file ``{case}.nii.gz`` beside that case's channel files is its mask and
  is ignored, and a folder with no channel files at all holds one single-channel case per file;
- image files, named either way.

A folder with nnU-Net's ``imagesTr/``, ``labelsTr/`` or ``imagesTs/`` but no ``dataset.json`` is refused,
saying so. Structural problems (a missing channel, a case found twice, a broken symbolic link, a file
without a channel number beside channel files but no image of its own, a file ``_0000.nii.gz`` without
a case id) are returned per case, named by the file, so that case fails alone and the others are still
predicted. Hidden files (``.name``, e.g. macOS's ``._`` copies) are skipped with a warning naming them.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pancreas_mtl.raw.io import image_suffix, strip_suffix
from pancreas_mtl.raw.layout import (CHANNEL_FILE, NNUNET_FOLDERS, SPLITS, SUBTYPE_FOLDER, Case, discover,
                                      image_file_name, is_dataset_root, nameless_file_problem, not_a_dataset)

log = logging.getLogger(__name__)



def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder, broken symbolic links included (their case fails, named); hidden files are
    skipped with a warning."""
    named = [p for p in folder.iterdir() if image_suffix(p) and (p.is_file() or _broken_link(p))]
    hidden = sorted(p.name for p in named if p.name.startswith("."))
    if hidden:
        log.warning("%s: %d hidden image file(s) skipped: %s", folder, len(hidden), ", ".join(hidden[:5]))
    return sorted(p for p in named if not p.name.startswith("."))


def _broken_link(path: Path) -> bool:
    """A symbolic link whose target does not exist or that loops back on itself."""
    return path.is_symlink() and not path.exists()


def _folder_images(folder: Path) -> list[Path]:
    """Image files of a folder, with those of its ``subtype{k}`` subfolders (a distributed split folder)."""
    files = _image_files(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and SUBTYPE_FOLDER.match(p.name)):
        files.extend(_image_files(sub))
    return files


def _cases_from_files(files: Sequence[Path], drop_unnumbered: bool) -> tuple[list[Case], dict[str, str]]:
    """Group image files into cases by name; ``drop_unnumbered``: where channel files are present, a file
    without a channel number is the mask of the case beside it (ignored), or else a problem."""
    channels: dict[str, dict[int, Path]] = defaultdict(dict)
    problems: dict[str, str] = {}
    numbered = {found["case"] for found in (CHANNEL_FILE.match(strip_suffix(p)) for p in files) if found}
    for path in files:
        match = CHANNEL_FILE.match(strip_suffix(path))
        if nameless_file_problem(path):
            problems[strip_suffix(path)] = f"{path}: {nameless_file_problem(path)}"
            continue
        if _broken_link(path):
            case_id = match["case"] if match else strip_suffix(path)
            problems[case_id] = (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist or "
                                 "links back to itself")
        if match is None:
            if drop_unnumbered and numbered:
                # not a mask beside its image: an image named without its channel, or a mask left alone
                name = strip_suffix(path)
                if name not in numbered:
                    problems[name] = (f"{path}: no channel number, and no image "
                                      f"{image_file_name(name, 0, image_suffix(path))} beside it; an image is "
                                      "named {case}_0000, a mask {case} beside its image")
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
    ``DatasetError`` when a dataset root does not pass discovery or nnU-Net's folders lack dataset.json.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input given")
    paths = [path.expanduser() for path in paths]
    if splits is not None:
        roots = [path for path in paths if path.is_dir() and is_dataset_root(path)]
        plain = [str(path) for path in paths if path not in roots]
        if not roots:
            raise ValueError(f"input_splits={list(splits)} selects splits of a dataset root (a folder with "
                             f"dataset.json or train/validation/test), but {', '.join(plain)} is not one; point "
                             "input at the dataset root, or drop input_splits")
        if plain:
            log.warning("input_splits applies to dataset roots only; every image of %s is predicted", ", ".join(plain))
    cases: dict[str, Case] = {}
    problems: dict[str, str] = {}
    loose_files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input {path} not found" + (" (a broken symbolic link)" if path.is_symlink()
                                                                  else ""))
        found: list[Case] = []
        if path.is_dir() and is_dataset_root(path):
            index = discover(path)
            unknown = sorted(set(splits or ()) - set(SPLITS))
            if unknown:
                raise ValueError(f"unknown split(s) {unknown}; expected some of {list(SPLITS)}")
            found = [Case(c.case_id, c.image_paths, None, c.subtype, c.split) for c in index.cases
                     if splits is None or c.split in splits]
        elif path.is_dir() and any((path / name).is_dir() for name in NNUNET_FOLDERS):
            # only dataset.json says which files are channels of which case: "no images found" would hide that
            raise not_a_dataset(path, "; or point input at one of those folders to predict its images")
        elif path.is_dir():
            found, folder_problems = _cases_from_files(_folder_images(path), drop_unnumbered=True)
            problems.update(folder_problems)
        elif image_suffix(path):
            if path.name.startswith("."):
                log.warning("input %s is a hidden file; predicted because it was named", path)
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

