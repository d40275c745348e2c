"""The key=value commands of ``pancreas-mtl`` (all but the Hydra ones, train, predict and tune): the
dataset tools (generate, convert, check), evaluate, the studies (crossval, holdout, compare) and export.

Each is a schema, the dataclass typing ``conf/{command}.yaml`` (the file holds the defaults; its keys
in the same order), and a ``run_*`` function taking the typed config and returning the exit code.
:mod:`pancreas_mtl.commands.cli` parses the command line into that config and dispatches by
:data:`COMMANDS`. A ``run_*`` imports its layer when called, so ``--help`` and a usage error load none.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class GenerateConfig:
    size: str = MISSING
    out: str = MISSING
    seed: int | None = MISSING
    workers: int = MISSING
    overwrite: bool = MISSING


@dataclass
class ConvertConfig:
    source: str = MISSING
    destination: str = MISSING
    name: str | None = MISSING
    link: bool = MISSING
    overwrite: bool = MISSING


@dataclass
class CheckConfig:
    root: str = MISSING
    workers: int = MISSING
    num_subtypes: int = MISSING


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    out: str = MISSING
    engine: str = MISSING
    precision: str = MISSING
    sw_batch_size: int = MISSING
    roi_size: list[int] | None = MISSING
    verify: bool = MISSING
    overwrite: bool = MISSING


def run_generate(cfg: DictConfig) -> int:
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    config = load_config(cfg.size)
    if cfg.seed is not None:
        config.seed = cfg.seed
    root = generate_dataset(Path(cfg.out), config, overwrite=cfg.overwrite, workers=cfg.workers)
    print(f"synthetic dataset ({cfg.size}, seed {config.seed}) in {root}")
    return 0


def run_convert(cfg: DictConfig) -> int:
    from pancreas_mtl.raw.convert import convert_to_nnunet

    index = convert_to_nnunet(cfg.source, cfg.destination, dataset_name=cfg.name, link=cfg.link,
                              overwrite=cfg.overwrite)
    print(f"wrote nnU-Net v2 raw dataset {index.root}: {len(index.labelled)} training case(s), "
          f"{len(index.split('test'))} test case(s)")
    return 0


def run_check(cfg: DictConfig) -> int:
    from pancreas_mtl.raw.layout import discover
    from pancreas_mtl.raw.limits import InputLimits
    from pancreas_mtl.planning.fingerprint import compute_fingerprint

    index = discover(cfg.root, num_subtypes=cfg.num_subtypes)
    splits = Counter(case.split for case in index.cases)
    print(f"{index.root}: {index.layout} layout, channels {index.channel_names}, labels {index.labels}")
    print("cases: " + ", ".join(f"{split} {count}" for split, count in sorted(splits.items())))
    limits = InputLimits.defaults()  # the defaults of data.limits (conf/limits/default.yaml)
    fingerprint = compute_fingerprint(index, num_workers=cfg.workers, limits=limits)
    spacings = sorted(fingerprint.spacings)
    print(f"all {len(fingerprint.case_ids)} labelled case(s) readable and consistent (spacing "
          f"{limits.min_spacing_mm:g} to {limits.max_spacing_mm:g} mm, at most "
          f"{limits.max_image_voxels:,} voxels)")
    print(f"subtypes: {fingerprint.subtype_counts}; label voxels: {fingerprint.label_voxel_counts}")
    print(f"spacing (z, y, x) median {spacings[len(spacings) // 2]}")
    for channel, stats in zip(index.channel_names.values(), fingerprint.intensity):
        print(f"{channel}: foreground p0.5 {stats.percentile_00_5:.1f}, p99.5 {stats.percentile_99_5:.1f}, "
              f"mean {stats.mean:.1f}, std {stats.std:.1f}")
    return 0


def _evaluation_schema() -> type:
    from pancreas_mtl.evaluation.evaluate import EvaluationConfig

    return EvaluationConfig


def run_evaluate(cfg: DictConfig) -> int:
    from pancreas_mtl.evaluation.evaluate import evaluate, format_summary

    evaluation = evaluate(cfg)
    print(format_summary(evaluation.summary))
    print(f"written to {Path(cfg.out)}")
    if cfg.wandb:
        from pancreas_mtl.tracking.command_runs import log_evaluation_run

        options = OmegaConf.to_container(cfg, resolve=True)
        keys = ("pred", "gt", "out", "splits", "tolerance_mm", "bootstrap", "num_subtypes")
        try:
            folder = log_evaluation_run(cfg.out, evaluation, pred=cfg.pred, project=cfg.wandb_project,
                                        config={key: options[key] for key in keys})
            print(f"W&B run (job_type evaluate) in {folder}")
        except Exception as error:  # noqa: BLE001 - a dashboard never fails an evaluation that is written
            logging.getLogger(__name__).warning("W&B: could not log the evaluation (%s: %s)",
                                                type(error).__name__, error)
    return 0


def _crossval_schema() -> type:
    from pancreas_mtl.studies.crossval import CrossvalConfig

    return CrossvalConfig


def run_crossval(cfg: DictConfig) -> int:
    from pancreas_mtl.studies.crossval import run_crossval
    from pancreas_mtl.evaluation.evaluate import format_summary
    from pancreas_mtl.files import load_json

    result = run_crossval(cfg)
    out = Path(result["ensemble"]).parent
    combined = result["scores"]["combined"]
    print(format_summary(load_json(out / "evaluation" / "summary.json")))
    print(f"{len(result['folds'])} folds, {result['num_cases']} out-of-fold case(s), combined score "
          f"{'n/a' if combined is None else f'{combined:.4f}'}; written to {out}\n"
          f"fold ensemble: python predict.py ckpt={result['ensemble']} input=... output=...")
    return 0


def _holdout_schema() -> type:
    from pancreas_mtl.studies.holdout import HoldoutConfig

    return HoldoutConfig


def run_holdout(cfg: DictConfig) -> int:
    from pancreas_mtl.studies.holdout import SUMMARY_FILE, run_holdout

    result = run_holdout(cfg)
    for job in result["jobs"]:
        scores = "; ".join(f"{split}: " + ", ".join(f"{key} {_score(values.get(key))}" for key in
                                                     ("whole_pancreas_dice", "lesion_dice", "macro_f1"))
                           for split, values in job["scores"].items())
        print(f"job {job['job']} ({' '.join(f'{k}={v}' for k, v in job['overrides'].items())}): {scores or 'not scored'}")
    if result["unfinished"]:
        print(f"not finished, skipped: jobs {', '.join(result['unfinished'])}")
    print(f"written to {Path(result['out']) / SUMMARY_FILE}; rank with pancreas-mtl compare runs=[{result['out']}] "
          "out=...")
    return 0


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _compare_schema() -> type:
    from pancreas_mtl.studies.compare import CompareConfig

    return CompareConfig


def run_compare(cfg: DictConfig) -> int:
    from pancreas_mtl.studies.compare import compare, format_ranking

    rows = compare(cfg)
    print(format_ranking(rows, cfg.metric))
    print(f"written to {Path(cfg.out) / 'compare.json'} and compare.csv")
    return 0


def run_export(cfg: DictConfig) -> int:
    from pancreas_mtl.inference.checkpoint import load_network
    from pancreas_mtl.inference.model_folder import export_model_folder
    from pancreas_mtl.inference.predictor import weights_digest

    network, plan, _ = load_network(cfg.ckpt)
    roi_size = None if cfg.roi_size is None else list(cfg.roi_size)
    out = export_model_folder(cfg.ckpt, network, plan, cfg.out, engine=cfg.engine, precision=cfg.precision,
                              sw_batch_size=cfg.sw_batch_size, roi_size=roi_size, verify=cfg.verify,
                              overwrite=cfg.overwrite, weights_digest=weights_digest(network))
    print(f"model folder ({cfg.engine}) written to {out}; predict with: python predict.py ckpt={out} input=... "
          "output=...")
    return 0


@dataclass(frozen=True)
class Command:
    schema: Callable[[], type]          # the dataclass typing conf/{command}.yaml (imported when needed)
    run: Callable[[DictConfig], int]    # the typed config -> exit code


COMMANDS = {
    "generate": Command(lambda: GenerateConfig, run_generate),
    "convert": Command(lambda: ConvertConfig, run_convert),
    "check": Command(lambda: CheckConfig, run_check),
    "evaluate": Command(_evaluation_schema, run_evaluate),
    "crossval": Command(_crossval_schema, run_crossval),
    "holdout": Command(_holdout_schema, run_holdout),
    "compare": Command(_compare_schema, run_compare),
    "export": Command(lambda: ExportConfig, run_export),
}
