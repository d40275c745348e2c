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
{command} --help`` prints the file); a dataclass in :mod:`pancreas_mtl.commands.tools` types it, beside
the function that runs the command. This module parses the command line, prints the usage and
dispatches. For the dataset tools and evaluation the overrides are read by Hydra's override parser and
set on the file's keys, rather than through ``@hydra.main``: the same override grammar, but no run
folder, no log file and no change of directory, so a command writes only where its keys say. Exit
codes: 0 done, 1 the command failed (the error names the file or case), 2 a usage error (unknown
command or key, missing required key, a value of the wrong type).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.commands.tools import COMMANDS
from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.errors import DatasetError

PROG = "pancreas-mtl"
HELP_FLAGS = ("-h", "--help")
SYNTAX = ("Values use Hydra's override syntax, as train.py and predict.py: key=value, lists as [a,b], "
          "null for none;\nquote a value holding spaces, commas or other special characters: key='/my data/x'.")


class UsageError(Exception):
    """A command line naming an unknown key, leaving a required key out, or giving a value of the wrong type."""


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
