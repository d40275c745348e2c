"""Dataset fingerprint: one checked pass over every labelled case, stored as JSON beside the cache.

The same pass is the dataset check: every case is loaded through ``load_case`` and the problems
of all cases are raised together.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.cropping import nonzero_bbox
from pancreas_mtl.raw.errors import DataError, DatasetError, Problem
from pancreas_mtl.raw.layout import Case, DatasetIndex
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.files import load_json, save_json
from pancreas_mtl.devices import map_with_progress
from pancreas_mtl.planning.plan import LESION_LABEL, ChannelIntensity, Fingerprint

log = logging.getLogger(__name__)


def source_signature(cases: list[Case]) -> str:
    """Hash of every source file's path, size and modification time: changes when any file does."""
    digest = hashlib.sha1()
    for case in sorted(cases, key=lambda c: c.case_id):
        digest.update(f"{case.case_id}|{case.subtype}|{case.split}".encode())
        for path in (*case.image_paths, *([case.label_path] if case.label_path else [])):
            stat = Path(path).stat()
            digest.update(f"|{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@dataclass
class _CaseStats:
    case_id: str
    spacing: tuple[float, float, float] | None = None
    shape_after_crop: tuple[int, int, int] | None = None
    foreground_samples: list[np.ndarray] | None = None  # per channel
    label_voxel_counts: dict[int, int] | None = None
    subtype: int | None = None
    problem: Problem | None = None


def _case_stats(case: Case, allowed_labels: set[int], samples_per_case: int, seed: int,
                limits: InputLimits | None = None) -> _CaseStats:
    try:
        loaded = load_case(case, allowed_labels, limits)
    except DataError as error:
        return _CaseStats(case.case_id, problem=Problem.from_error(error))
    box = nonzero_bbox(loaded.image)
    shape = tuple(stop - start for start, stop in box)
    foreground = loaded.seg > 0
    rng = np.random.default_rng([seed, int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16)])
    samples = []
    for channel in loaded.image:
        values = channel[foreground]
        if values.size > samples_per_case:
            values = rng.choice(values, samples_per_case, replace=False)
        samples.append(values.astype(np.float32))
    counts = np.bincount(loaded.seg.ravel(), minlength=max(allowed_labels) + 1)
    return _CaseStats(case.case_id, spacing=loaded.spacing, shape_after_crop=shape, foreground_samples=samples,
                      label_voxel_counts={int(k): int(v) for k, v in enumerate(counts)}, subtype=case.subtype)


def _intensity(samples: np.ndarray) -> ChannelIntensity:
    if samples.size == 0:
        return ChannelIntensity(mean=0.0, std=1.0, percentile_00_5=0.0, percentile_99_5=0.0, median=0.0, min=0.0, max=0.0)
    low, median, high = np.percentile(samples, [0.5, 50.0, 99.5])
    return ChannelIntensity(mean=float(samples.mean()), std=float(samples.std()), percentile_00_5=float(low),
                            percentile_99_5=float(high), median=float(median), min=float(samples.min()),
                            max=float(samples.max()))


def compute_fingerprint(index: DatasetIndex, *, num_workers: int = 0, samples_per_case: int = 10_000,
                        seed: int = 1234, progress: bool = True,
                        limits: InputLimits | None = None) -> Fingerprint:
    """Fingerprint of the labelled cases; raises DatasetError listing every problem found.

    ``limits`` (``data.limits``; None: the defaults) are the plausible spacing and largest image.
    """
    cases = index.labelled
    if not cases:
        raise DatasetError([Problem(None, index.root, "no labelled cases to fingerprint")], index.root)
    stats = map_with_progress(_case_stats,
                              [(case, index.label_values, samples_per_case, seed, limits) for case in cases],
                              num_workers=num_workers, desc="fingerprint", progress=progress)
    problems = [s.problem for s in stats if s.problem is not None]
    problems += [Problem(s.case_id, None, "mask has no foreground (no pancreas and no lesion)")
                 for s in stats if s.problem is None and sum(v for k, v in s.label_voxel_counts.items() if k > 0) == 0]
    if problems:
        raise DatasetError(problems, index.root)
    lesion = index.labels.get("lesion", LESION_LABEL)
    without_lesion = [s.case_id for s in stats if s.subtype is not None and not s.label_voxel_counts.get(lesion)]
    if without_lesion:  # allowed (a lesion-free pancreas is a valid mask), but the subtype label cannot be learnt
        log.warning("%d labelled case(s) with a subtype have no lesion (label %d) in their mask; with "
                    "loss.cls_loss.no_lesion_policy=skip (the default) they train the segmentation only: %s",
                    len(without_lesion), lesion, ", ".join(without_lesion))
    num_channels = len(index.channel_names)
    intensity = [_intensity(np.concatenate([s.foreground_samples[c] for s in stats])) for c in range(num_channels)]
    label_counts: dict[int, int] = {}
    for s in stats:
        for label, count in s.label_voxel_counts.items():
            label_counts[label] = label_counts.get(label, 0) + count
    subtype_counts: dict[int, int] = {}
    for s in stats:
        if s.subtype is not None:
            subtype_counts[s.subtype] = subtype_counts.get(s.subtype, 0) + 1
    return Fingerprint(case_ids=[s.case_id for s in stats], spacings=[s.spacing for s in stats],
                       shapes_after_crop=[s.shape_after_crop for s in stats], intensity=intensity,
                       label_voxel_counts=label_counts, subtype_counts=dict(sorted(subtype_counts.items())),
                       source_signature=source_signature(cases), channel_names=dict(index.channel_names),
                       labels=dict(index.labels))


def load_or_compute_fingerprint(index: DatasetIndex, path: str | Path, **kwargs) -> Fingerprint:
    """The stored fingerprint when it matches the current source files, else a new one (stored)."""
    path = Path(path)
    signature = source_signature(index.labelled)
    if path.is_file():
        try:
            stored = Fingerprint.from_dict(load_json(path))
            if stored.source_signature == signature:
                return stored
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # an unreadable fingerprint is recomputed
    fingerprint = compute_fingerprint(index, **kwargs)
    save_json(fingerprint.to_dict(), path)
    return fingerprint
