"""Converting a dataset in the distributed layout to an nnU-Net v2 raw dataset (``pancreas-mtl convert``).

Only what a conversion wrote is ever replaced: ``conversion.json`` lists every file (written first),
and a target holding anything else is refused (:mod:`pancreas_mtl.output_guard`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from pancreas_mtl.raw.io import image_suffix
from pancreas_mtl.raw.layout import (
    SPLITS_FILE,
    SUBTYPE_MAPPING_FILE,
    DatasetIndex,
    discover,
)
from pancreas_mtl.files import atomic_path
from pancreas_mtl.output_guard import (
    changed_files,
    describe_paths,
    file_digests,
    foreign_entries,
    listed_files,
    read_manifest,
    refuse_reads,
    remove_listed,
    write_manifest,
)

CONVERSION_MANIFEST = "conversion.json"  # what a conversion wrote: only those files are ever replaced
log = logging.getLogger(__name__)


def convert_to_nnunet(source: str | Path, destination: str | Path, *, dataset_name: str | None = None,
                      link: bool = False, overwrite: bool = False) -> DatasetIndex:
    """Write a distributed-layout dataset as an nnU-Net v2 raw dataset.

    Train and validation cases go to imagesTr/labelsTr, test cases to imagesTs. The subtype of
    each labelled case goes to subtype_mapping.json, and the distributed train/validation split
    becomes the single fold of splits_final.json, so the converted dataset trains on the same split.
    ``conversion.json`` (the source and every file the conversion writes) is written first, each
    file atomically, ``dataset.json`` last: a converted folder without it is incomplete.

    ``overwrite`` replaces an earlier conversion: the files its ``conversion.json`` lists, and the
    folders they leave empty, are removed first, so the result is the new dataset alone. An
    incomplete earlier conversion (no ``dataset.json``) is replaced without asking.

    Raises:
        FileExistsError: ``destination`` holds anything an earlier conversion's ``conversion.json``
            does not list (with or without ``overwrite``: nothing is written or removed), or holds a
            complete earlier conversion and ``overwrite`` is False.
    """
    index = discover(source) if not isinstance(source, DatasetIndex) else source
    if index.layout != "distributed":
        raise ValueError(f"{index.root}: already in the nnU-Net layout")
    destination = Path(destination).expanduser().resolve()
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination}: is a file, not a folder to convert into")
    ending = index.file_ending
    placed: dict[str, Path] = {}
    for case in index.cases:
        images_dir = "imagesTs" if case.split == "test" else "imagesTr"
        for channel, image in enumerate(case.image_paths):
            placed[f"{images_dir}/{case.case_id}_{channel:04d}{ending}"] = image
        if case.label_path is not None:
            placed[f"labelsTr/{case.case_id}{ending}"] = case.label_path
    validation = [case.case_id for case in index.split("validation")]
    files = sorted([*placed, SUBTYPE_MAPPING_FILE, *([SPLITS_FILE] if validation else []), "dataset.json"])

    manifest_path = destination / CONVERSION_MANIFEST
    found = read_manifest(manifest_path)
    listed = listed_files(found) if found is not None else None
    foreign = foreign_entries(destination, listed or [], CONVERSION_MANIFEST)
    if foreign:
        why = (f"not listed in the {CONVERSION_MANIFEST} of the conversion that wrote it"
               if listed is not None
               else f"the folder has no {CONVERSION_MANIFEST}, the converter's list of the files it wrote")
        raise FileExistsError(
            f"{destination}: holds {len(foreign)} file(s) or folder(s) the converter did not write ({why}): "
            f"{describe_paths(foreign)}. The converter writes only into an empty folder or over its own "
            "earlier conversion, with or without overwrite: choose another destination.")
    refuse_reads(destination, [index.root])
    changed = changed_files(destination, found.get("sha256") if found else None)
    if changed:
        raise FileExistsError(f"{destination}: {describe_paths(changed)} changed after the conversion wrote them "
                              "(edited by hand?): they are the user's and never replaced, with or without "
                              "overwrite: move them out, or choose another destination.")
    if listed is not None:
        if (destination / "dataset.json").is_file() and not overwrite:
            raise FileExistsError(f"{destination}: holds a dataset converted earlier (from "
                                  f"{found.get('converted_from')}); pass overwrite=True (overwrite=true on the "
                                  "command line) to replace "
                                  f"it (only the files its {CONVERSION_MANIFEST} lists are removed)")
        if not overwrite:
            log.warning("%s: an incomplete earlier conversion (no dataset.json); replacing it", destination)
        (destination / "dataset.json").unlink(missing_ok=True)  # first: the folder reads as incomplete
        remove_listed(destination, listed, CONVERSION_MANIFEST)
    write_manifest(manifest_path, {"converted_from": str(index.root), "files": files})
    for relative, image in tqdm(placed.items(), desc="convert", unit="file"):
        _place(image, destination / relative, link)
    _write_text(destination / SUBTYPE_MAPPING_FILE,
                json.dumps({case.case_id: case.subtype for case in index.labelled}, indent=1, sort_keys=True))
    if validation:
        fold = {"train": [case.case_id for case in index.split("train")], "val": validation}
        _write_text(destination / SPLITS_FILE, json.dumps([fold], indent=1))
    description = {
        "name": dataset_name or index.name,
        "channel_names": {str(k): v for k, v in index.channel_names.items()},
        "labels": index.labels,
        "numTraining": len(index.labelled),
        "file_ending": ending,
        "converted_from": str(index.root),
    }
    _write_text(destination / "dataset.json", json.dumps(description, indent=1))
    write_manifest(manifest_path, {"converted_from": str(index.root), "files": files,
                                   "sha256": file_digests(destination, files)})
    return discover(destination, num_subtypes=index.num_subtypes)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _place(source: Path, target: Path, link: bool) -> None:
    """Copy (or symlink) ``source`` to ``target`` atomically."""
    with atomic_path(target, suffix=image_suffix(target) or "") as tmp:
        if link:
            tmp.symlink_to(source.resolve())
        else:
            shutil.copy2(source, tmp)
