"""Dataset discovery in the two layouts users bring, and conversion from the distributed one to nnU-Net's.

1. Distributed layout (as the quiz data ships)::

       root/train/subtype0/quiz_0_041_0000.nii.gz   image, channel 0000
       root/train/subtype0/quiz_0_041.nii.gz        mask
       root/validation/subtype{0,1,2}/...           same naming
       root/test/quiz_037_0000.nii.gz               images only

2. nnU-Net v2 raw layout::

       root/dataset.json             channel_names, labels, numTraining, file_ending
       root/imagesTr/{case}_{XXXX}{file_ending}
       root/labelsTr/{case}{file_ending}
       root/imagesTs/{case}_{XXXX}{file_ending}   optional
       root/subtype_mapping.json     {case: subtype}; without it cases have no subtype
       root/splits_final.json        optional, nnU-Net's [{"train": [...], "val": [...]}, ...]

Discovery checks structure only (which files exist and what they are called); what is inside the
files is checked while fingerprinting (``pancreas_mtl.raw.checks``). Every structural problem is
collected and raised together as one DatasetError.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pancreas_mtl.raw.errors import DatasetError, Problem
from pancreas_mtl.raw.io import image_suffix, strip_suffix

DEFAULT_LABELS = {"background": 0, "pancreas": 1, "lesion": 2}
SPLITS = ("train", "validation", "test")
SUBTYPE_MAPPING_FILE = "subtype_mapping.json"
SPLITS_FILE = "splits_final.json"
# the file and folder names of both layouts, for every reader (discovery, prediction inputs, evaluation)
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # {case}_{XXXX} without the suffix
# "_0000": a channel number without a case id; read as an unnumbered file it would pass for a mask
NAMELESS_CHANNEL_FILE = re.compile(r"^_\d{4}$")
SUBTYPE_FOLDER = re.compile(r"^subtype(?P<subtype>\d+)$")
NNUNET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")
log = logging.getLogger(__name__)


def image_file_name(case_id: str, channel: int = 0, ending: str = ".nii.gz") -> str:
    """The file name of a case's channel image in either layout: ``{case}_{XXXX}{ending}``."""
    return f"{case_id}_{channel:04d}{ending}"


def nameless_file_problem(path: Path) -> str | None:
    """What is wrong with an image file named by its channel number only (``_0000.nii.gz``), or None."""
    if NAMELESS_CHANNEL_FILE.match(strip_suffix(path)):
        return f"no case id before the channel number: expected {{case}}{Path(path).name}"
    return None


def is_dataset_root(folder: Path) -> bool:
    """Whether ``folder`` is a dataset root in either layout (dataset.json, or train/validation/test)."""
    folder = Path(folder)
    return (folder / "dataset.json").is_file() or any((folder / split).is_dir() for split in SPLITS)


@dataclass(frozen=True)
class Case:
    """One case: its channel images (in channel order), its mask if labelled, its subtype if known."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    subtype: int | None
    split: str  # "train", "validation" or "test", as the layout says


@dataclass
class DatasetIndex:
    """What discovery found: the cases of a dataset and its declared channels, labels and splits."""

    root: Path
    layout: str  # "distributed" or "nnunet"
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]
    splits: list[dict[str, list[str]]] | None = None
    num_subtypes: int = 3
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Case]:
        return [case for case in self.cases if case.split == name]

    @property
    def labelled(self) -> list[Case]:
        return [case for case in self.cases if case.label_path is not None]

    @property
    def label_values(self) -> set[int]:
        return set(self.labels.values())


def discover(root: str | Path, num_subtypes: int = 3) -> DatasetIndex:
    """Read a dataset folder in either layout; raises DatasetError listing every structural problem."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError([Problem(None, root, "dataset folder not found")])
    if (root / "dataset.json").is_file():
        return _discover_nnunet(root, num_subtypes)
    if is_dataset_root(root):
        return _discover_distributed(root, num_subtypes)
    raise not_a_dataset(root)


def not_a_dataset(folder: Path, nnunet_advice: str = "") -> DatasetError:
    """The error for a folder in neither layout; nnU-Net's folders without dataset.json are named as such
    (``nnunet_advice`` appended to that message)."""
    found = [f"{name}/" for name in NNUNET_FOLDERS if (folder / name).is_dir()]
    if found:
        message = (f"not a dataset: found {', '.join(found)} but no dataset.json; the nnU-Net v2 raw layout "
                   "expects dataset.json beside them (channel_names, labels, numTraining, file_ending)"
                   + nnunet_advice)
    else:
        message = ("not a dataset: expected dataset.json (nnU-Net v2 raw layout) or train/, validation/, "
                   "test/ folders (distributed layout)")
    return DatasetError([Problem(None, folder, message)])


def _group_channels(image_files: list[Path], problems: list[Problem]) -> dict[str, dict[int, Path]]:
    """{case: {channel: path}} from files named {case}_{XXXX}{suffix}; misnamed files become problems."""
    channels: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in image_files:
        match = CHANNEL_FILE.match(strip_suffix(path))
        if match is None:
            problems.append(Problem(None, path, nameless_file_problem(path)
                                    or "image name should end with a 4-digit channel, e.g. case_0000.nii.gz"))
            continue
        channels[match["case"]][int(match["channel"])] = path
    return channels


def _channel_tuple(case_id: str, found: dict[int, Path], num_channels: int, folder: Path,
                   ending: str, problems: list[Problem]) -> tuple[Path, ...] | None:
    missing = [channel for channel in range(num_channels) if channel not in found]
    extra = sorted(set(found) - set(range(num_channels)))
    for channel in missing:
        problems.append(Problem(case_id, folder / f"{case_id}_{channel:04d}{ending}",
                                f"channel {channel} file missing (expected {num_channels} channel(s))"))
    for channel in extra:
        problems.append(Problem(case_id, found[channel],
                                f"unexpected channel {channel}: the dataset declares {num_channels} channel(s)"))
    if missing:
        return None
    return tuple(found[channel] for channel in range(num_channels))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))


def _discover_distributed(root: Path, num_subtypes: int) -> DatasetIndex:
    problems: list[Problem] = []
    cases: list[Case] = []
    entries: list[tuple[str, int | None, Path, dict[str, dict[int, Path]], dict[str, Path]]] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        if split == "test":
            folders = [(None, split_dir)]
        else:
            folders = []
            for sub in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                match = SUBTYPE_FOLDER.match(sub.name)
                if match is None:
                    problems.append(Problem(None, sub, "expected a folder named subtype0, subtype1, ..."))
                    continue
                subtype = int(match["subtype"])
                if subtype >= num_subtypes:
                    problems.append(Problem(None, sub, f"subtype {subtype} outside 0..{num_subtypes - 1}"))
                    continue
                folders.append((subtype, sub))
        for subtype, folder in folders:
            files = _image_files(folder)
            for nameless in [p for p in files if nameless_file_problem(p)]:
                problems.append(Problem(None, nameless, nameless_file_problem(nameless)))
                files.remove(nameless)
            masks = {strip_suffix(p): p for p in files if not CHANNEL_FILE.match(strip_suffix(p))}
            channel_files = [p for p in files if CHANNEL_FILE.match(strip_suffix(p))]
            entries.append((split, subtype, folder, _group_channels(channel_files, problems), masks))

    all_channels = {channel for *_, grouped, _ in entries for found in grouped.values() for channel in found}
    num_channels = max(all_channels) + 1 if all_channels else 1
    ending = next((image_suffix(p) for *_, grouped, _ in entries for found in grouped.values()
                   for p in found.values()), ".nii.gz")
    seen: dict[str, Path] = {}
    for split, subtype, folder, grouped, masks in entries:
        for case_id in sorted(grouped):
            if case_id in seen:
                masks.pop(case_id, None)  # the duplicate's own mask, not a mask without an image
                problems.append(Problem(case_id, folder, f"case also present in {seen[case_id]}; a case "
                                        "belongs to one split and one subtype folder"))
                continue
            seen[case_id] = folder
            images = _channel_tuple(case_id, grouped[case_id], num_channels, folder, ending, problems)
            label = masks.pop(case_id, None)
            if split != "test" and label is None:
                problems.append(Problem(case_id, folder / f"{case_id}{ending}", "mask file missing"))
                continue
            if images is not None:
                cases.append(Case(case_id, images, label, subtype, split))
        for orphan_id, orphan in masks.items():
            problems.append(Problem(orphan_id, orphan, "mask without an image (expected "
                                    f"{orphan_id}_0000{ending} beside it)"))
    if not cases and not problems:
        problems.append(Problem(None, root, "no cases found"))
    if problems:
        raise DatasetError(problems, root)
    return DatasetIndex(root=root, layout="distributed", name=root.name,
                        channel_names={c: "CT" if c == 0 else f"channel{c}" for c in range(num_channels)},
                        labels=dict(DEFAULT_LABELS), file_ending=ending,
                        cases=sorted(cases, key=lambda case: case.case_id), num_subtypes=num_subtypes)


def _read_json(path: Path, problems: list[Problem]):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(Problem(None, path, f"cannot read JSON ({exc})"))
        return None


def _discover_nnunet(root: Path, num_subtypes: int) -> DatasetIndex:
    problems: list[Problem] = []
    description = _read_json(root / "dataset.json", problems)
    if not isinstance(description, dict):
        if description is not None:
            problems.append(Problem(None, root / "dataset.json", "expected a JSON object"))
        raise DatasetError(problems, root)
    channel_names = description.get("channel_names", description.get("modality"))
    required = {"channel_names": channel_names, "labels": description.get("labels"),
                "numTraining": description.get("numTraining"), "file_ending": description.get("file_ending")}
    missing = [key for key, value in required.items() if value is None]
    if missing:
        problems.append(Problem(None, root / "dataset.json", f"missing field(s): {', '.join(missing)}"))
        raise DatasetError(problems, root)
    channel_names = {int(k): str(v) for k, v in channel_names.items()}
    labels = {str(k): v for k, v in description["labels"].items()}
    if any(not isinstance(v, int) for v in labels.values()):
        problems.append(Problem(None, root / "dataset.json", f"labels must map names to integers, found {labels}"))
    ending = str(description["file_ending"])
    num_channels = len(channel_names)
    if sorted(channel_names) != list(range(num_channels)):
        problems.append(Problem(None, root / "dataset.json",
                                f"channel_names keys must be 0..{num_channels - 1}, found {sorted(channel_names)}"))

    mapping_path = root / SUBTYPE_MAPPING_FILE
    subtypes = _read_json(mapping_path, problems) if mapping_path.is_file() else None
    cases: list[Case] = []
    training_ids: set[str] = set()
    for split, images_dir, labels_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", None)):
        folder = root / images_dir
        if not folder.is_dir():
            if split == "train":
                problems.append(Problem(None, folder, "imagesTr folder missing"))
            continue
        grouped = _group_channels([p for p in _image_files(folder) if p.name.endswith(ending)], problems)
        label_folder = root / labels_dir if labels_dir else None
        label_ids = ({strip_suffix(p) for p in _image_files(label_folder) if p.name.endswith(ending)}
                     if label_folder and label_folder.is_dir() else set())
        for case_id in sorted(grouped):
            images = _channel_tuple(case_id, grouped[case_id], num_channels, folder, ending, problems)
            label = None
            subtype = None
            if split == "train":
                training_ids.add(case_id)
                label = label_folder / f"{case_id}{ending}"
                if case_id not in label_ids:
                    problems.append(Problem(case_id, label, "mask file missing"))
                    continue
                if subtypes is not None:
                    subtype = _subtype_of(case_id, subtypes, mapping_path, num_subtypes, problems)
            if images is not None:
                cases.append(Case(case_id, images, label, subtype, split))
        for orphan in sorted(label_ids - set(grouped)):
            problems.append(Problem(orphan, label_folder / f"{orphan}{ending}",
                                    f"mask without an image (expected {orphan}_0000{ending} in {images_dir})"))
    if isinstance(subtypes, dict):
        for unknown in sorted(set(subtypes) - training_ids):
            problems.append(Problem(unknown, mapping_path, "subtype mapping names a case that is not in imagesTr"))
    if isinstance(description["numTraining"], int) and training_ids and description["numTraining"] != len(training_ids):
        problems.append(Problem(None, root / "dataset.json",
                                f"numTraining is {description['numTraining']} but imagesTr holds {len(training_ids)} case(s)"))
    splits = None
    if (root / SPLITS_FILE).is_file():
        splits = _read_json(root / SPLITS_FILE, problems)
        splits = _checked_splits(splits, training_ids, root / SPLITS_FILE, problems)
    if problems:
        raise DatasetError(problems, root)
    return DatasetIndex(root=root, layout="nnunet", name=str(description.get("name", root.name)),
                        channel_names=channel_names, labels=labels, file_ending=ending,
                        cases=sorted(cases, key=lambda case: case.case_id), splits=splits,
                        num_subtypes=num_subtypes)


def _subtype_of(case_id: str, subtypes, mapping_path: Path, num_subtypes: int, problems: list[Problem]) -> int | None:
    if not isinstance(subtypes, dict):
        return None
    if case_id not in subtypes:
        problems.append(Problem(case_id, mapping_path, "case missing from the subtype mapping"))
        return None
    value = subtypes[case_id]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_subtypes:
        problems.append(Problem(case_id, mapping_path, f"subtype must be an integer in 0..{num_subtypes - 1}, found {value!r}"))
        return None
    return value


def _checked_splits(splits, training_ids: set[str], path: Path, problems: list[Problem]):
    if splits is None:
        return None
    if not isinstance(splits, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in splits):
        problems.append(Problem(None, path, 'expected a list of {"train": [...], "val": [...]} folds'))
        return None
    for fold, entry in enumerate(splits):
        unknown = sorted((set(entry["train"]) | set(entry["val"])) - training_ids)
        if unknown:
            problems.append(Problem(None, path, f"fold {fold} names case(s) not in imagesTr: {', '.join(unknown[:10])}"))
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]
