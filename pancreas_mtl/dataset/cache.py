"""The preprocessing cache: every case preprocessed once per plan, reused until its source changes.

Layout under the cache root of a dataset::

    fingerprint.json
    {plan.preprocessing_key()}/plan.json
    {plan.preprocessing_key()}/{case}_image.npy, _seg.npy, _fg.npy, .json   (see cached_case.py)

An entry is reused when its JSON exists, names the same source files with the same sizes and
modification times, and its arrays load with the recorded shapes and the SHA-256 recorded when they
were written; otherwise it is rebuilt (a changed digest with a warning naming the case and the file).
An entry written before entries carried digests is adopted: its digests are added, once its image is
found finite (a non-finite one is rebuilt). Every
file is written under a temporary name and renamed, the JSON last, so a run killed mid-write
leaves no entry that looks complete, and two processes building the same entry do not corrupt it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.errors import DataError, DatasetError, Problem
from pancreas_mtl.raw.layout import Case, DatasetIndex
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.dataset.preprocessing import preprocess, sample_foreground_locations
from pancreas_mtl.files import atomic_path, load_json, save_json, sha256
from pancreas_mtl.devices import map_with_progress
from pancreas_mtl.planning.plan import Plan

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# an entry's JSON: {file name: SHA-256} of its arrays, and {file name: [size, mtime_ns]} as written. The
# digest is checked before a run for every array whose size or modification time changed since (a write,
# a copy); an array not written since is not read again (0.06 s per 60 MB image saved at every start)
CHECKSUMS, WRITTEN_STAT = "sha256", "stat"


def dataset_cache_root(cache_dir: str | Path, index: DatasetIndex) -> Path:
    """Cache folder of one dataset: its name plus a hash of its location, so equal names do not collide."""
    location = hashlib.sha1(str(index.root).encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser().resolve() / f"{index.name}-{location}"


def _file_record(path: Path) -> list:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _source_records(case: Case) -> list[list]:
    return [_file_record(p) for p in (*case.image_paths, *([case.label_path] if case.label_path else []))]


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path, suffix=".npy") as tmp:  # np.save appends .npy to any other name
        np.save(tmp, array)


def _array_paths(entry: CachedCase) -> list[Path]:
    return [entry.image_path, *([entry.seg_path, entry.foreground_path] if entry.has_label else [])]


def _checksums(entry: CachedCase) -> dict[str, str]:
    return {path.name: sha256(path) for path in _array_paths(entry)}


def _stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _stats(entry: CachedCase) -> dict[str, list[int]]:
    return {path.name: _stat(path) for path in _array_paths(entry)}


def _damage(entry: CachedCase, recorded, written_stat) -> str | None:
    """What is damaged: the first array written since (its size or modification time differs from
    ``written_stat``) whose bytes differ from the SHA-256 recorded when it was written, or the record
    itself; None when every array matches."""
    names = [path.name for path in _array_paths(entry)]
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(names):
        return (f"{entry.properties_path}: its {CHECKSUMS!r} record is {recorded!r}, expected the SHA-256 "
                f"of {names}")
    written_stat = written_stat if isinstance(written_stat, dict) else {}
    changed = next((path for path in _array_paths(entry)
                    if written_stat.get(path.name) != _stat(path) and sha256(path) != recorded[path.name]), None)
    if changed is None:
        return None
    return (f"{changed} differs from the SHA-256 recorded in {entry.properties_path} when it was written "
            "(a damaged or edited file)")


def _adopt(entry: CachedCase, properties: dict) -> CachedCase | None:
    """An entry written before entries carried digests, kept with its digests added; None (rebuilt) when
    its image holds NaN or infinity, which preprocessing never writes."""
    if not np.isfinite(entry.load_image()).all():
        log.warning("cache entry of case %s: %s holds values that are not finite (a damaged file); "
                    "rebuilding the entry", entry.case_id, entry.image_path)
        return None
    save_json({**properties, CHECKSUMS: _checksums(entry), WRITTEN_STAT: _stats(entry)}, entry.properties_path)
    return entry


def cached_entry(folder: Path, case: Case, plan_key: str) -> CachedCase | None:
    """The cached case if its entry is complete, current and undamaged (its arrays' SHA-256), else None."""
    properties_path = folder / f"{case.case_id}.json"
    try:
        properties = load_json(properties_path)
        if (properties.get("format_version") != CACHE_FORMAT_VERSION or properties.get("plan_key") != plan_key
                or properties.get("sources") != _source_records(case) or properties.get("subtype") != case.subtype):
            return None
        entry = CachedCase.from_properties(folder, properties)
        image = entry.load_image()
        if image.shape != tuple(properties["image_shape"]):
            return None
        if entry.has_label:
            if entry.load_seg().shape != entry.shape or entry.load_foreground_locations().shape[1] != 4:
                return None
        if CHECKSUMS not in properties:
            return _adopt(entry, properties)
        damage = _damage(entry, properties[CHECKSUMS], properties.get(WRITTEN_STAT))
        if damage is not None:
            log.warning("cache entry of case %s: %s; rebuilding the entry", case.case_id, damage)
            return None
        return entry
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def build_entry(case: Case, plan: Plan, folder: Path, seed: int = 0, limits: InputLimits | None = None
                ) -> CachedCase | Problem:
    """Preprocess one case into ``folder``; a bad case comes back as a Problem instead of raising."""
    limits = limits or InputLimits.defaults()
    try:
        loaded = load_case(case, set(plan.labels.values()), limits)
        result = preprocess(loaded, plan, max_resampled_voxels=limits.max_resampled_voxels)
    except DataError as error:
        return Problem.from_error(error)
    _save_npy(result.image, folder / f"{case.case_id}_image.npy")
    label_voxel_counts = {}
    if result.seg is not None:
        _save_npy(result.seg, folder / f"{case.case_id}_seg.npy")
        rng = np.random.default_rng([seed, int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16)])
        _save_npy(sample_foreground_locations(result.seg, rng), folder / f"{case.case_id}_fg.npy")
        counts = np.bincount(result.seg.ravel().astype(np.int64), minlength=plan.num_classes)
        label_voxel_counts = {str(label): int(count) for label, count in enumerate(counts)}
    properties = {
        "format_version": CACHE_FORMAT_VERSION,
        "plan_key": plan.preprocessing_key(),
        "case_id": case.case_id,
        "subtype": case.subtype,
        "split": case.split,
        "has_label": result.seg is not None,
        "sources": _source_records(case),
        "original_shape": list(result.original_shape),
        "original_spacing": list(result.original_spacing),
        "affine": np.asarray(loaded.affine).tolist(),
        "bbox": [list(b) for b in result.bbox],
        "shape_after_preprocessing": list(result.image.shape[1:]),
        "image_shape": list(result.image.shape),
        "target_spacing": list(plan.target_spacing),
        "label_voxel_counts": label_voxel_counts,
    }
    entry = CachedCase.from_properties(folder, properties)
    properties[CHECKSUMS] = _checksums(entry)  # of the files as written (still in the page cache)
    properties[WRITTEN_STAT] = _stats(entry)
    save_json(properties, entry.properties_path)
    return entry


def build_cache(index: DatasetIndex, plan: Plan, cache_root: str | Path, *, cases: list[Case] | None = None,
                num_workers: int = 0, progress: bool = True, seed: int = 0,
                limits: InputLimits | None = None) -> list[CachedCase]:
    """Preprocess every case not yet cached for this plan; returns the cached cases in index order.

    ``limits`` (``data.limits``; None: the defaults) bound the spacing and the sizes read and resampled.

    Raises DatasetError listing every case that could not be preprocessed; the good ones stay cached.
    """
    cases = index.cases if cases is None else cases
    plan_key = plan.preprocessing_key()
    folder = Path(cache_root) / plan_key
    folder.mkdir(parents=True, exist_ok=True)
    save_json(plan.to_dict(), folder / "plan.json")
    entries: dict[str, CachedCase] = {}
    todo = []
    for case in cases:
        entry = cached_entry(folder, case, plan_key)
        if entry is None:
            todo.append(case)
        else:
            entries[case.case_id] = entry
    built = map_with_progress(build_entry, [(case, plan, folder, seed, limits) for case in todo],
                              num_workers=num_workers, desc=f"preprocess ({len(entries)} cached)",
                              progress=progress)
    problems = [result for result in built if isinstance(result, Problem)]
    entries.update({result.case_id: result for result in built if isinstance(result, CachedCase)})
    if problems:
        raise DatasetError(problems, index.root)
    return [entries[case.case_id] for case in cases]
