"""Predicting a list of cases into an output folder: resumable, atomic, one bad case never stops the rest.

For each case: load (``load_case`` without a mask) -> preprocess -> network(s) -> back to the input's
grid -> optional postprocessing -> write ``{case}.nii.gz`` (and ``{case}.npz`` probabilities) between the
case's record marked ``writing`` and its full record (``output_folder``). A case is finished when its
finished record and files exist; a rerun skips finished cases unless ``overwrite``. A folder whose
files this tool did not write, or that holds another model's predictions, is refused before any case
(``output_folder.open_output_folder``). The tables (``subtype_results.csv``,
``subtype_probabilities.csv``) are rebuilt from the records after every run, so a killed run followed
by a rerun lists every case exactly once. The next case is loaded and preprocessed in a background
thread while the current one is on the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.layout import Case
from pancreas_mtl.dataset.preprocessing import PreprocessedCase
from pancreas_mtl.files import write_csv
from pancreas_mtl.inference.input_grid import restore_original_geometry, write_mask, write_probabilities
from pancreas_mtl.inference.output_folder import (
    SUBTYPE_PROBABILITIES,
    SUBTYPE_RESULTS,
    TABLES,
    TABLES_UNIT,
    TIMINGS,
    TIMINGS_UNIT,
    case_files,
    finished_records,
    is_finished,
    mark_finished,
    mark_writing,
    mask_name,
    open_output_folder,
    probabilities_name,
)
from pancreas_mtl.inference.postprocessing import keep_largest_components
from pancreas_mtl.inference.predictor import Predictor
from pancreas_mtl.inference.sliding_window import OutOfMemoryError, release_memory
from pancreas_mtl.output_guard import OutputFolder

log = logging.getLogger(__name__)

STAGES = ("load", "preprocess", "network", "export", "write")


@dataclass
class RunSummary:
    """What a run did: cases predicted, skipped (finished earlier) and failed (with the reason), and
    the per-case timings of the predicted ones."""

    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files changed by hand since written: never replaced

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@dataclass
class _Loaded:
    """A case loaded and preprocessed (what the background thread hands over)."""

    case: Case
    affine: np.ndarray
    preprocessed: PreprocessedCase
    seconds: dict[str, float]


def _load(predictor: Predictor, case: Case) -> _Loaded:
    start = time.perf_counter()
    loaded = load_case(case, limits=predictor.limits)
    loaded_at = time.perf_counter()
    preprocessed = predictor.preprocess(loaded)
    return _Loaded(case, loaded.affine, preprocessed,
                   {"load": loaded_at - start, "preprocess": time.perf_counter() - loaded_at})


def predict_cases(predictor: Predictor, cases: Sequence[Case], output_dir: str | Path, *,
                  problems: Mapping[str, str] | None = None, overwrite: bool = False,
                  save_probabilities: bool = False, postprocessing: Mapping[str, bool] | None = None,
                  progress: bool = True, prefetch: bool = True, run_info: Mapping | None = None) -> RunSummary:
    """Predict ``cases`` into ``output_dir``; see the module docstring.

    Args:
        problems: ``{case_id: reason}`` of cases input discovery could not build; reported as failed.
        postprocessing: ``{"largest_pancreas": bool, "largest_lesion": bool}``
            (:func:`~pancreas_mtl.inference.postprocessing.keep_largest_components`).
        run_info: stored in every record (checkpoints, preset, ...).
    """
    output_dir = Path(output_dir)
    # every switch named, off unless given: a folder predicted without postprocessing has the identity of
    # predict.py's default (both off), so either may finish the other's cases
    postprocessing = {"largest_pancreas": False, "largest_lesion": False, **dict(postprocessing or {})}
    identity = {**predictor.identity(), "postprocessing": {key: bool(value) for key, value in postprocessing.items()}}
    folder = open_output_folder(output_dir, [case.case_id for case in cases], identity, overwrite=overwrite,
                                save_probabilities=save_probabilities,
                                reads=[path for case in cases for path in case.image_paths])
    summary = RunSummary(failed=dict(problems or {}))
    for case_id, reason in summary.failed.items():
        log.error("case %s failed: %s", case_id, reason)
    todo = []
    for case in cases:
        changed = [name for name in case_files(case.case_id, save_probabilities) if not folder.may_write(name)]
        if changed:  # corrected by hand: the user's now (the guard warned, naming the file)
            summary.skipped.append(case.case_id)
            summary.kept.extend(changed)
            continue
        if not overwrite and is_finished(output_dir, case.case_id, save_probabilities):
            summary.skipped.append(case.case_id)
            continue
        # redone from scratch: a failure now must not leave an earlier run's files looking current; only
        # files this tool's record lists, unchanged, are removed (open_output_folder refused anything else)
        if folder.remove_unit(case.case_id):
            summary.skipped.append(case.case_id)
            continue
        todo.append(case)
    if summary.skipped:
        log.info("%d case(s) finished earlier, skipped (overwrite=true redoes them)", len(summary.skipped))

    executor = ThreadPoolExecutor(max_workers=1) if prefetch else None
    pending: Future | None = None
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress)
    try:
        for index, case in enumerate(todo):
            current = pending
            pending = None
            if executor is not None and index + 1 < len(todo):
                pending = executor.submit(_load, predictor, todo[index + 1])
            bar.set_postfix_str(case.case_id)
            try:
                loaded = current.result() if current is not None else _load(predictor, case)
                timing = _predict_one(predictor, loaded, folder, save_probabilities, postprocessing,
                                      dict(run_info or {}))
                summary.predicted.append(case.case_id)
                summary.timings.append(timing)
            except Exception as error:  # noqa: BLE001 - one bad case must not stop the others
                reason = f"{type(error).__name__}: {error}"
                summary.failed[case.case_id] = reason
                log.error("case %s failed: %s", case.case_id, reason)
            bar.update()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    _write_run_tables(folder, summary)
    if summary.timings:
        log.info("per-case timings (s):\n%s", format_timings(summary.timings))
    log.info("%d predicted, %d skipped, %d failed -> %s", len(summary.predicted), len(summary.skipped),
             len(summary.failed), output_dir)
    if summary.failed:
        log.error("failed case(s):\n%s", "\n".join(f"  {c}: {r}" for c, r in sorted(summary.failed.items())))
    return summary


def _predict_one(predictor: Predictor, loaded: _Loaded, folder: OutputFolder, save_probabilities: bool,
                 postprocessing: dict, run_info: dict) -> dict:
    seconds = dict(loaded.seconds)
    case_id = loaded.case.case_id
    start = time.perf_counter()
    prediction = predictor.predict_preprocessed(loaded.preprocessed.image, case_id=case_id)
    predictor.synchronize()
    network_done = time.perf_counter()
    # nnunet_compat: nnU-Net resamples the logits; otherwise the probabilities are (input_grid.py)
    scores, are_logits = ((prediction.logits, True) if prediction.logits is not None
                          else (prediction.probabilities, False))
    try:
        labels, probabilities = restore_original_geometry(scores, loaded.preprocessed, predictor.plan.target_spacing,
                                                          save_probabilities, are_logits)
    except OutOfMemoryError:
        labels = None  # retried below, once the exception and the tensors its frames hold are gone
    if labels is None:
        release_memory(scores.device)
        log.warning("case %s: out of memory resampling the prediction on %s; resampling on the CPU", case_id,
                    scores.device)
        labels, probabilities = restore_original_geometry(scores.cpu(), loaded.preprocessed,
                                                          predictor.plan.target_spacing, save_probabilities,
                                                          are_logits)
    if postprocessing.get("largest_pancreas") or postprocessing.get("largest_lesion"):
        labels = keep_largest_components(labels, pancreas=bool(postprocessing.get("largest_pancreas")),
                                         lesion=bool(postprocessing.get("largest_lesion")),
                                         lesion_label=predictor.lesion_channel)
    export_done = time.perf_counter()
    subtypes = None if prediction.subtype_probabilities is None else prediction.subtype_probabilities.tolist()
    output_dir = folder.path
    files = case_files(case_id, save_probabilities)
    mark_writing(folder, case_id, files)
    write_mask(labels, loaded.affine, output_dir / mask_name(case_id), loaded.case.image_paths[0])
    if save_probabilities:
        write_probabilities(output_dir / probabilities_name(case_id), probabilities, subtypes)
    seconds.update(network=network_done - start, export=export_done - network_done,
                   write=time.perf_counter() - export_done)
    seconds["total"] = sum(seconds[stage] for stage in STAGES)
    record = {
        "case_id": case_id,
        "mask": mask_name(case_id),
        "files": files,
        "subtype": None if subtypes is None else int(np.argmax(subtypes)),
        "subtype_probabilities": subtypes,
        "inputs": [str(path) for path in loaded.case.image_paths],
        "shape_zyx": list(labels.shape),
        "windows": prediction.windows,
        "box_zyx": [list(b) for b in prediction.box],
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **prediction.info,
        **run_info,
    }
    mark_finished(folder, record)  # last: the case is finished once this exists
    return {"case_id": case_id, **seconds, "windows": prediction.windows,
            "shape_zyx": "x".join(map(str, labels.shape))}


def read_records(output_dir: str | Path) -> list[dict]:
    """The records of every finished case in ``output_dir`` (whose mask exists), sorted by mask name."""
    return finished_records(output_dir)


def write_tables(folder: OutputFolder) -> list[str]:
    """``subtype_results.csv`` (``Names,Subtype``) and ``subtype_probabilities.csv`` (``Names,p0,p1,...``)
    from the records, sorted by name; not written when no case has subtype probabilities, nor where the user
    changed them by hand. Under the folder's lock: parallel runs into one folder each rebuild them whole."""
    with folder.lock():
        records = [r for r in read_records(folder.path) if r.get("subtype_probabilities")]
        if not records:
            return []
        num_subtypes = len(records[0]["subtype_probabilities"])
        tables = {SUBTYPE_RESULTS: (["Names", "Subtype"], [[r["mask"], r["subtype"]] for r in records]),
                  SUBTYPE_PROBABILITIES: (["Names", *(f"p{k}" for k in range(num_subtypes))],
                                          [[r["mask"], *(f"{p:.6f}" for p in r["subtype_probabilities"])]
                                           for r in records])}
        for name in folder.changed(TABLES):
            folder.keep(name)
        written = [name for name in TABLES if folder.may_write(name)]
        for name in written:
            write_csv(folder.path / name, *tables[name])
        folder.record(TABLES_UNIT, written)
    return written


def _write_run_tables(folder: OutputFolder, summary: RunSummary) -> None:
    """The tables, and this run's timings; a failure to write them (a full disk) fails no case already
    written: it is logged and counted among the failures, and a rerun writes them."""
    try:
        write_tables(folder)
        if summary.timings and folder.may_write(TIMINGS) and not folder.changed([TIMINGS]):
            write_timings(folder.path / TIMINGS, summary.timings)
            folder.record(TIMINGS_UNIT, [TIMINGS])
    except OSError as error:
        reason = f"{type(error).__name__}: {error.strerror or error}"
        summary.failed["(tables)"] = f"could not write the tables in {folder.path}: {reason}; rerun to write them"
        log.error("could not write the tables in %s: %s", folder.path, reason)


def write_timings(path: Path, timings: Sequence[dict]) -> None:
    columns = ["case_id", *STAGES, "total", "windows", "shape_zyx"]
    rows = [[t["case_id"], *(f"{t[c]:.3f}" for c in (*STAGES, "total")), t["windows"], t["shape_zyx"]]
            for t in timings]
    write_csv(path, [c if c in ("case_id", "windows", "shape_zyx") else f"{c}_s" for c in columns], rows)


def format_timings(timings: Sequence[dict]) -> str:
    """A fixed-width table of the per-case stage times and their mean."""
    width = max(8, *(len(t["case_id"]) for t in timings))
    stages = (*STAGES, "total")
    lines = [f"{'case':<{width}} " + " ".join(f"{s:>10}" for s in stages) + f" {'windows':>8}"]
    for t in timings:
        lines.append(f"{t['case_id']:<{width}} " + " ".join(f"{t[s]:>10.2f}" for s in stages) + f" {t['windows']:>8}")
    means = [float(np.mean([t[s] for t in timings])) for s in stages]
    windows = float(np.mean([t["windows"] for t in timings]))
    lines.append(f"{'mean':<{width}} " + " ".join(f"{m:>10.2f}" for m in means) + f" {windows:>8.1f}")
    return "\n".join(lines)
