"""The synthetic dataset on disk: which cases it holds and where their files go (the distributed layout),
and writing it into a folder with the generator's manifest (``synthetic.json``), idempotently, and
never over or instead of files the generator did not write.

Each case is drawn by :func:`pancreas_mtl.synthetic.generator.generate_case` from its own seeded stream.

    pancreas-mtl generate size=default out=outputs/data/synthetic_default
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.files import atomic_path
from pancreas_mtl.output_guard import (
    changed_files,
    describe_paths,
    file_digests,
    foreign_entries,
    listed_files,
    read_manifest,
    remove_listed,
    write_manifest,
)
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.raw.layout import image_file_name
from pancreas_mtl.synthetic.generator import NUM_SUBTYPES, SyntheticConfig, generate_case

GENERATOR_VERSION = 4  # bump whenever the same config would give other images, or a preset changes
# (4: the default preset's test split grew from 12 to 60 cases; a stale set is regenerated, listed files only)
MARKER_FILE = "synthetic.json"        # the manifest: version, config, files; "complete" set last
TEST_LABELS_DIR = "test_labels"       # test masks and subtypes, out of discovery's way
log = logging.getLogger(__name__)
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class PlannedCase:
    """Name, split and subtype of one case, and the key of its random stream (independent of other cases)."""

    case_id: str
    split: str
    subtype: int
    rng_key: tuple[int, ...]

    def relative_paths(self) -> tuple[str, str]:
        """(image, mask) paths under the dataset root; test masks go to test_labels/."""
        if self.split == "test":
            return f"test/{image_file_name(self.case_id)}", f"{TEST_LABELS_DIR}/{self.case_id}.nii.gz"
        folder = f"{self.split}/subtype{self.subtype}"
        return f"{folder}/{image_file_name(self.case_id)}", f"{folder}/{self.case_id}.nii.gz"


def plan_cases(config: SyntheticConfig) -> list[PlannedCase]:
    """Every case of the dataset. Numbers are shuffled so that neither a name's number nor the
    order of test cases tells the subtype; train and validation share each subtype's numbers."""
    naming = np.random.default_rng([config.seed, 1_000_003])
    cases = []
    for subtype in range(NUM_SUBTYPES):
        n_train, n_val = config.train_counts[subtype], config.validation_counts[subtype]
        numbers = naming.permutation(n_train + n_val) + 1
        for split, chosen in (("train", numbers[:n_train]), ("validation", numbers[n_train:])):
            key = _SPLIT_CODES[split]
            cases += [PlannedCase(f"quiz_{subtype}_{n:03d}", split, subtype, (key, subtype, int(n)))
                      for n in sorted(chosen)]
    test_subtypes = np.repeat(np.arange(NUM_SUBTYPES), config.test_counts)
    numbers = naming.permutation(len(test_subtypes)) + 1
    cases += [PlannedCase(f"quiz_{n:03d}", "test", int(s), (_SPLIT_CODES["test"], int(n)))
              for n, s in sorted(zip(numbers, test_subtypes))]
    return cases


def _write_case(root: Path, config: SyntheticConfig, planned: PlannedCase) -> None:
    case = generate_case(config, np.random.default_rng([config.seed, *planned.rng_key]), planned.subtype)
    image_path, mask_path = planned.relative_paths()
    write_nifti(case.image, case.affine, root / image_path)
    write_nifti(case.stored_mask(), case.affine, root / mask_path)


def _marker(config: SyntheticConfig) -> dict:
    return {"generator_version": GENERATOR_VERSION, "config": config.to_dict()}


def planned_files(config: SyntheticConfig) -> list[str]:
    """Every file ``generate_dataset`` writes for ``config`` (relative paths), but the marker."""
    files = [path for case in plan_cases(config) for path in case.relative_paths()]
    return sorted([*files, f"{TEST_LABELS_DIR}/subtypes.json", f"{TEST_LABELS_DIR}/subtype_reference.csv"])


def _files_of(found: dict) -> list[str] | None:
    """What a marker says its generator wrote. A marker of the format before file lists (written
    last, by version 3 and earlier) names its config, and the config names the files."""
    files = listed_files(found)
    if files is not None or "files" in found:
        return files
    try:
        return planned_files(SyntheticConfig.from_dict(found.get("config") or {}, source=MARKER_FILE))
    except (TypeError, ValueError):
        return None  # a config this code cannot read: nothing can be told to be the generator's


def _state(root: Path) -> tuple[dict | None, list[str] | None, list[str]]:
    """(marker, the files it lists, the entries it does not list). A concurrent run writes its marker
    before its first file: when the marker changed during the scan, the scan is repeated."""
    marker_path = root / MARKER_FILE
    for _ in range(5):
        found = read_manifest(marker_path)
        listed = _files_of(found) if found is not None else None
        foreign = foreign_entries(root, listed or [], MARKER_FILE)
        if read_manifest(marker_path) == found:
            break
    return found, listed, foreign


def _refuse_foreign(root: Path, foreign: list[str], listed: bool) -> None:
    if not foreign:
        return
    why = (f"not listed in its {MARKER_FILE}" if listed
           else f"the folder has no {MARKER_FILE}, the generator's list of the files it wrote")
    raise FileExistsError(
        f"{root}: holds {len(foreign)} file(s) or folder(s) the synthetic-data generator did not write "
        f"({why}): {describe_paths(foreign)}. The generator writes only into an empty folder or one it "
        "generated, and never removes what it did not write, with or without overwrite: "
        "choose another folder, or move those files out.")


def generate_dataset(root: str | Path, config: SyntheticConfig, *, overwrite: bool = False,
                     progress: bool = True, workers: int = 0) -> Path:
    """Write the dataset under ``root`` in the distributed layout; returns ``root``.

    ``synthetic.json`` is the generator's manifest: its version, the config and every file it
    writes, saved (atomically) before the first case as incomplete and marked complete after the
    last, so a killed run still knows what it may have left. Idempotent: a complete dataset of
    the same config is left as it is; an incomplete one is completed. Parallel-safe: concurrent
    calls with the same config write identical files atomically. Each case comes from its own
    seeded stream, so the files do not depend on ``workers``. Test masks go to
    ``test_labels/{case}.nii.gz``, test subtypes to ``test_labels/subtypes.json`` and
    ``test_labels/subtype_reference.csv`` (the ``Names,Subtype`` format a prediction run writes).

    Replacing (``overwrite=True``, or a dataset an older generator version wrote, which is
    regenerated with a warning) removes the files the manifest lists and the folders they leave
    empty, nothing else.

    Raises:
        FileExistsError: ``root`` holds anything the manifest does not list, or is not empty and has
            no manifest (a dataset of one's own): flag or not, nothing is written or removed. Or
            ``root`` holds a dataset of another config and ``overwrite`` is False.
    """
    from pancreas_mtl.devices import map_with_progress

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: is a file, not a folder to generate the synthetic dataset into")
    marker_path, expected = root / MARKER_FILE, _marker(config)
    planned, files = plan_cases(config), planned_files(config)
    found, listed, foreign = _state(root)
    same = found is not None and all(found.get(key) == value for key, value in expected.items())
    if same and found.get("complete", "files" not in found) and not overwrite:
        if "files" not in found and listed is not None:  # a pre-manifest marker: add the list, keep the files
            write_manifest(marker_path, {**expected, "complete": True, "files": listed})
        return root
    _refuse_foreign(root, foreign, listed is not None)
    changed = changed_files(root, found.get("sha256") if found else None)
    if changed:
        raise FileExistsError(f"{root}: {describe_paths(changed)} changed after the generator wrote them (edited "
                              "by hand?): they are the user's and never replaced, with or without overwrite: move "
                              "them out, or choose another folder.")
    stale = found is not None and found.get("generator_version", 0) < GENERATOR_VERSION
    if found is not None and not same and not stale and not overwrite:
        found_config = found.get("config", {})
        differing = sorted(k for k, v in expected["config"].items() if found_config.get(k) != v)
        raise FileExistsError(f"{root}: holds a synthetic dataset of another configuration (differs in "
                              f"{differing or ['generator_version']}); pass overwrite=True (overwrite=true on "
                              "the command line) "
                              f"to replace it (only the files its {MARKER_FILE} lists are removed)")
    if stale and not overwrite:
        log.warning("%s: synthetic dataset of generator version %s, this is version %s; regenerating it",
                    root, found.get("generator_version"), GENERATOR_VERSION)
    remove = [] if listed is None else listed if (overwrite or not same) else sorted(set(listed) - set(files))
    if remove:
        # list old and new files first: a run killed while removing still knows both
        write_manifest(marker_path, {**expected, "complete": False, "files": sorted({*listed, *files})})
        remove_listed(root, remove, MARKER_FILE)
    write_manifest(marker_path, {**expected, "complete": False, "files": files})
    map_with_progress(_write_case, [(root, config, case) for case in planned], num_workers=workers,
                      desc=f"synthetic {config.name}", progress=progress)
    test = [case for case in planned if case.split == "test"]
    with atomic_path(root / TEST_LABELS_DIR / "subtypes.json") as tmp:
        tmp.write_text(json.dumps({c.case_id: c.subtype for c in test}, indent=1))
    with atomic_path(root / TEST_LABELS_DIR / "subtype_reference.csv") as tmp:
        tmp.write_text("Names,Subtype\n" + "".join(f"{c.case_id}.nii.gz,{c.subtype}\n" for c in test))
    write_manifest(marker_path, {**expected, "complete": True, "files": files, "sha256": file_digests(root, files)})
    return root
