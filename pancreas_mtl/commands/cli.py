"""The ``pancreas-mtl`` command: training, prediction and studies (``train``, ``predict``, ``tune``: the
Hydra commands that train.py, predict.py and tune.py run in a checkout, with the same grammar and
outputs), and the dataset tools and evaluation, each taking ``key=value`` overrides of its YAML file
under conf/, in Hydra's override syntax.

    pancreas-mtl train experiment=cpu_demo [-m seed=1,2,3]
    pancreas-mtl predict ckpt=<run>/checkpoints/last.ckpt input=/data/test output=/data/pred
    pancreas-mtl tune hparams_search=optuna experiment=cpu_demo

    pancreas-mtl generate out=outputs/data/synthetic_default [size=tiny] [seed=3] [overwrite=true]
    pancreas-mtl convert source=/data/quiz destination=/data/Dataset501_Pancreas
    pancreas-mtl check root=/data/quiz
    pancreas-mtl evaluate pred=/data/pred gt=/data/quiz/validation out=/data/eval
    pancreas-mtl crossval multirun=outputs/runs/train/multirun/<date>_<time>
    pancreas-mtl holdout multirun=outputs/runs/train/multirun/<date>_<time>
    pancreas-mtl compare runs=[<multirun A>,<multirun B>] out=outputs/compare [ensembles=true]
    pancreas-mtl export ckpt=outputs/runs/train/<run>/checkpoints/last.ckpt out=models/fold0 [engine=onnxruntime]

``conf/{command}.yaml`` holds every key of a command with its default and its meaning (``pancreas-mtl
{command} --help`` prints the file); a dataclass here types it. For the dataset tools and evaluation the
overrides are read by Hydra's override parser and set on the file's keys, rather than through
``@hydra.main``: the same override
grammar, but no run folder, no log file and no change of directory, so a command writes only where its
keys say. Exit codes: 0 done, 1 the command
failed (the error names the file or case), 2 a usage error (unknown command or key, missing required
key, a value of the wrong type).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.errors import DatasetError

PROG = "pancreas-mtl"
HELP_FLAGS = ("-h", "--help")
SYNTAX = ("Values use Hydra's override syntax, as train.py and predict.py: key=value, lists as [a,b], "
          "null for none;\nquote a value holding spaces, commas or other special characters: key='/my data/x'.")


class UsageError(Exception):
    """A command line naming an unknown key, leaving a required key out, or giving a value of the wrong type."""


# --- the commands: a schema types conf/{command}.yaml, which holds the defaults ----------------------

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
    from pancreas_mtl.synthetic.generator import generate_dataset, load_config

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
    limits = InputLimits()  # the defaults of data.limits (conf/limits/default.yaml)
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


# --- configs from the command line ------------------------------------------------------------------

# The Hydra commands: each module's ``main`` parses sys.argv as its script in a checkout would (train.py,
# predict.py, tune.py), with run folders, logs and multiruns as there.
HYDRA_COMMANDS = {
    "train": ("pancreas_mtl.commands.train", "train a network (conf/train.yaml; Hydra: -m for a multirun, --help)"),
    "predict": ("pancreas_mtl.commands.predict", "predict masks and subtypes with trained checkpoints (conf/predict.yaml)"),
    "tune": ("pancreas_mtl.commands.tune", "an Optuna study over training runs (conf/tune.yaml; needs the sweep extra)"),
}


def run_hydra_command(command: str, overrides: Sequence[str]) -> int:
    """``pancreas-mtl train|predict|tune ...``: the command module's ``main`` with ``sys.argv`` as its own
    script would see it. argv[0] is the module's file, so Lightning's DDP launcher, which starts ranks
    1.. by running ``sys.argv`` again, runs the same command (``python <module file> <overrides>``)."""
    module = importlib.import_module(HYDRA_COMMANDS[command][0])
    sys.argv = [str(module.__file__), *overrides]
    result = module.main()  # the Hydra mains exit with 1 or 2 themselves on a refusal; tune returns its code
    return result if isinstance(result, int) else 0


def config_text(command: str) -> str:
    """The text of ``conf/{command}.yaml``, comments included (they document the keys)."""
    return (config_dir() / f"{command}.yaml").read_text()


def _key_comments(text: str) -> dict[str, str]:
    """{key: its comment} of the top-level ``key: value  # comment`` lines of a command's YAML."""
    return {match["key"]: match["comment"].strip()
            for match in re.finditer(r"^(?P<key>\w+):[^#\n]*#(?P<comment>.*)$", text, flags=re.MULTILINE)}


def _not_key_value(command: str, arg: str, defaults: DictConfig) -> str:
    """The error for an argument that is not ``key=value``: a --flag or a bare value, as argparse took them."""
    known = [str(key) for key in defaults]
    name = arg.lstrip("-").replace("-", "_")
    if arg.startswith("-") and name in known:
        example = "true" if OmegaConf.select(defaults, name, throw_on_missing=False) in (True, False) else "..."
        return f"{arg!r}: options are key=value: {name}={example}"
    if arg.startswith("-"):
        return f"{arg!r}: options are key=value; {PROG} {command} knows: {', '.join(known)}"
    required = [key for key in known if OmegaConf.is_missing(defaults, key)]
    hint = f", e.g. {required[0]}={arg}" if required else ""
    return f"{arg!r} is not key=value{hint}; {PROG} {command} knows: {', '.join(known)}"


def load_config(command: str, overrides: Sequence[str]) -> DictConfig:
    """``conf/{command}.yaml`` with ``key=value`` overrides, typed by the command's schema, interpolations
    resolved.

    Raises:
        UsageError: an argument that is not ``key=value`` of a key the file holds (the error names the
            known keys), a sweep (``a,b``), a value of the wrong type, or a required key (``???``) left out.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    text = config_text(command)
    defaults = OmegaConf.create(text)
    known = [str(key) for key in defaults]  # the command configs are flat
    args = list(overrides)
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            raise UsageError(_not_key_value(command, arg, defaults))
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as error:
        raise UsageError(f"{error}\n{SYNTAX}") from None
    for override in parsed:
        key, line = override.key_or_group, override.input_line
        if key not in known:
            raise UsageError(f"unknown key {key!r} in {line!r}; {PROG} {command} knows: {', '.join(known)}")
        if override.type is not OverrideType.CHANGE or override.package is not None:
            raise UsageError(f"{line!r}: give the key as {key}=value (no +, ~ or @)")
        if override.is_sweep_override():
            raise UsageError(f"{line!r}: one value per key (a comma or a range is a sweep, which only "
                             f"train.py -m runs); quote a value holding a comma: {key}='a,b'")
    try:  # the file is flat, so each override sets one key (Hydra's compose would take a key named like a
        # config group under conf/, e.g. crossval's inference=accurate, for a group override and fail)
        cfg = OmegaConf.merge(OmegaConf.structured(COMMANDS[command].schema()), defaults)
        for override in parsed:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        key, message = getattr(error, "full_key", None), str(error).splitlines()[0]
        raise UsageError(f"{key}: {message}" if key else message) from None
    missing = [key for key in known if OmegaConf.is_missing(cfg, key)]
    if missing:
        comments = _key_comments(text)
        lines = [f"  {key}=...  ({comments[key]})" if key in comments else f"  {key}=..." for key in missing]
        raise UsageError("missing required key(s):\n" + "\n".join(lines))
    return cfg


# --- help and main ----------------------------------------------------------------------------------

def _summary(command: str) -> str:
    """The first line of the command's YAML, its one-line description."""
    return config_text(command).splitlines()[0].lstrip("# ").strip()


def usage() -> str:
    width = max(map(len, [*HYDRA_COMMANDS, *COMMANDS]))
    lines = [f"usage: {PROG} <command> key=value ...", "",
             "Each command reads its keys and defaults from conf/<command>.yaml.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in HYDRA_COMMANDS.items()]
    lines += [f"  {name:<{width}}  {_summary(name)}" for name in COMMANDS]
    lines += ["", f"{PROG} <command> --help prints the command's keys, their defaults and what each means.",
              SYNTAX, "In a checkout, python train.py, predict.py and tune.py are the same three commands."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    return (f"usage: {PROG} {command} key=value ...\n\nconf/{command}.yaml: every key, its default and its "
            f"meaning (??? is required)\n\n{config_text(command).rstrip()}\n\n{SYNTAX}")


def main(argv: Sequence[str] | None = None) -> int:
    """``pancreas-mtl <command> key=value ...``; returns the exit code (0 done, 1 the command failed, 2 usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in HELP_FLAGS:
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, overrides = args[0], args[1:]
    if command in HYDRA_COMMANDS:
        return run_hydra_command(command, overrides)
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}; commands: {', '.join([*HYDRA_COMMANDS, *COMMANDS])}\n"
              f"(see {PROG} --help)", file=sys.stderr)
        return 2
    if any(arg in HELP_FLAGS for arg in overrides):
        print(command_help(command))
        return 0
    try:
        cfg = load_config(command, overrides)
    except UsageError as error:
        print(f"{PROG} {command}: error: {error}\n(see {PROG} {command} --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[command].run(cfg)
    except (DatasetError, OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
