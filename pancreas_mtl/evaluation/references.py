"""Reading what an evaluation compares: the reference cases (masks and subtypes from a dataset root, a
split folder or a folder of masks), the predicted masks, subtypes and probabilities, and each case's
image, reference and prediction files.

``gt`` is a dataset root in either layout (masks and subtypes from the layout; ``splits`` picks splits),
a split folder with ``subtype{k}/`` subfolders, or a folder of masks ``{case}.nii.gz`` with the subtypes
in ``subtypes`` (JSON ``{case: k}`` or CSV ``Names,Subtype``) or beside the masks (``subtypes.json``,
``subtype_mapping.json`` or ``subtype_reference.csv``, as the synthetic set's ``test_labels/`` has).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.errors import DatasetError
from pancreas_mtl.raw.io import image_suffix, strip_suffix
from pancreas_mtl.raw.layout import CHANNEL_FILE, SUBTYPE_FOLDER, discover, image_file_name, is_dataset_root

SUBTYPE_FILES = ("subtypes.json", "subtype_mapping.json", "subtype_reference.csv")


# --- masks, subtypes and probabilities --------------------------------------------------------------

def label_maps(folder: Path) -> dict[str, Path]:
    """{case: path} of the label maps in a folder: image files without a channel number."""
    return {strip_suffix(p): p for p in sorted(folder.iterdir())
            if p.is_file() and image_suffix(p) and not p.name.startswith(".")
            and not CHANNEL_FILE.match(strip_suffix(p))}


def read_subtypes(path: str | Path) -> dict[str, int]:
    """{case: subtype} from JSON ``{case: k}`` or a CSV with ``Names`` and ``Subtype`` columns."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{case: subtype}}")
        return {strip_suffix(k): int(v) for k, v in data.items()}
    rows = _read_csv(path, ["Names", "Subtype"])
    return {strip_suffix(row["Names"]): int(row["Subtype"]) for row in rows}


def read_probabilities(path: str | Path) -> dict[str, np.ndarray]:
    """{case: (K,) probabilities} from a ``Names,p0,p1,...`` CSV."""
    rows = _read_csv(path, ["Names", "p0"])
    columns = sorted((c for c in rows[0] if re.fullmatch(r"p\d+", c)), key=lambda c: int(c[1:])) if rows else []
    return {strip_suffix(row["Names"]): np.array([float(row[c]) for c in columns]) for row in rows}


def _read_csv(path: str | Path, required: Sequence[str]) -> list[dict]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: expected columns {list(required)}, found {reader.fieldnames}")
        return list(reader)


def reference_cases(gt: str | Path, subtypes: str | Path | None = None, splits: Sequence[str] | None = None,
                    num_subtypes: int = 3) -> dict[str, tuple[Path, int | None]]:
    """{case: (reference mask, subtype or None)} from a dataset root, a split folder or a folder of masks."""
    gt = Path(gt).expanduser()
    if not gt.is_dir():
        raise FileNotFoundError(f"reference folder {gt} not found")
    if is_dataset_root(gt):
        index = discover(gt, num_subtypes=num_subtypes)
        reference = {c.case_id: (c.label_path, c.subtype) for c in index.labelled
                     if splits is None or c.split in splits}
    else:
        reference = {case: (path, None) for case, path in label_maps(gt).items()}
        for sub in sorted(p for p in gt.iterdir() if p.is_dir() and SUBTYPE_FOLDER.match(p.name)):
            subtype = int(SUBTYPE_FOLDER.match(sub.name)["subtype"])
            reference.update({case: (path, subtype) for case, path in label_maps(sub).items()})
        if subtypes is None:
            subtypes = next((gt / name for name in SUBTYPE_FILES if (gt / name).is_file()), None)
    if subtypes is not None:
        mapping = read_subtypes(subtypes)
        missing = sorted(set(reference) - set(mapping))
        if missing:
            raise ValueError(f"{subtypes}: no subtype for {len(missing)} reference case(s): "
                             f"{', '.join(missing[:20])}")
        reference = {case: (path, mapping[case]) for case, (path, _) in reference.items()}
    if not reference:
        raise ValueError(f"no reference masks found in {gt}")
    return reference


def check_same_cases(what: str, found: Sequence[str], expected: Sequence[str]) -> None:
    """ValueError listing the cases missing from ``what`` and those it has beyond the reference."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        lines = [f"{what} and the reference hold different cases:"]
        if missing:
            lines.append(f"  missing from {what} ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  not in the reference ({len(extra)}): {', '.join(extra)}")
        raise ValueError("\n".join(lines))


# --- each case's files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseFiles:
    """One evaluated case's files: the image (first channel; None when it cannot be found), the reference
    mask and the predicted mask."""

    case_id: str
    image: Path | None
    truth: Path
    prediction: Path


def _images_in(folder: Path) -> dict[str, Path]:
    """{case: channel-0 image} of a folder and its subtype folders."""
    found = {}
    for path in sorted([*folder.glob("*"), *folder.glob("subtype*/*")]):
        match = CHANNEL_FILE.match(strip_suffix(path))
        if image_suffix(path) and match and int(match["channel"]) == 0:
            found[match["case"]] = path
    return found


def _images_from_layout(gt: Path, num_subtypes: int) -> dict[str, Path]:
    """{case: channel-0 image} of the dataset ``gt`` is (or whose folder it is in, as test_labels/), or {}."""
    for root in (gt, gt.parent):
        if is_dataset_root(root):
            try:
                return {case.case_id: case.image_paths[0] for case in discover(root, num_subtypes).cases}
            except DatasetError:
                return {}
    return {}


def find_case_files(pred: str | Path, gt: str | Path, cases: Sequence[str] | None = None,
                    images: str | Path | None = None, subtypes: str | Path | None = None,
                    num_subtypes: int = 3) -> dict[str, CaseFiles]:
    """{case: CaseFiles} of an evaluation's inputs (``evaluate``'s ``pred``, ``gt``, ``subtypes``).

    The image ``{case}_0000{ending}`` is looked for in ``images`` (and its ``subtype*/`` folders), beside
    the reference mask, then in the dataset ``gt`` is or lies in (the synthetic set's ``test_labels/``
    finds ``test/``); a case without one gets ``image=None``.
    """
    pred, gt = Path(pred).expanduser(), Path(gt).expanduser()
    if not pred.is_dir():
        raise FileNotFoundError(f"prediction folder {pred} not found")
    reference = reference_cases(gt, subtypes, None, num_subtypes)
    cases = sorted(reference) if cases is None else list(cases)
    unknown = [case for case in cases if case not in reference]
    if unknown:
        raise ValueError(f"{gt}: no reference mask for {len(unknown)} case(s): {', '.join(unknown[:20])}")
    predictions = {strip_suffix(p): p for p in pred.iterdir() if p.is_file() and image_suffix(p)}
    missing = [case for case in cases if case not in predictions]
    if missing:
        raise ValueError(f"{pred}: no predicted mask for {len(missing)} case(s): {', '.join(missing[:20])}")
    given = _images_in(Path(images).expanduser()) if images else {}
    layout: dict[str, Path] | None = None
    files = {}
    for case in cases:
        truth = reference[case][0]
        image = given.get(case)
        if image is None:
            beside = truth.with_name(image_file_name(case, 0, image_suffix(truth) or ".nii.gz"))
            image = beside if beside.is_file() else None
        if image is None:
            layout = _images_from_layout(gt, num_subtypes) if layout is None else layout
            image = layout.get(case)
        files[case] = CaseFiles(case, image, truth, predictions[case])
    return files
