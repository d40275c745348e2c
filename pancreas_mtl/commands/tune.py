"""Hyperparameter study over training runs: ``python tune.py hparams_search=optuna [key=value ...]``, or
``pancreas-mtl tune ...`` from an installed package.

Composes conf/tune.yaml (conf/train.yaml, the search space conf/hparams_search/<name>.yaml and the
study settings ``tune.*``) and runs Optuna trials until the study in ``tune.storage`` has
``tune.n_trials`` finished ones, each trial a training run in its own folder under ``tune.study_dir``
(pancreas_mtl.training.tune). Several workers (the same command in other processes or SLURM jobs)
share one study through the storage. ``--help`` prints the config. Exit codes: 0 done, 1 a refused
file or value, 2 a wrong study setting or override.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from pancreas_mtl.commands import refusals
from pancreas_mtl.config import config_dir, expand_shorthands


def optuna_experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def main(argv: Sequence[str] | None = None) -> int:
    """The study for these overrides (``sys.argv[1:]`` when None); returns the exit code."""
    overrides = expand_shorthands(list(sys.argv[1:] if argv is None else argv))  # pretrained=PATH and the like
    if {"-h", "--help"} & set(overrides):
        print(__doc__)
        print(f"conf/tune.yaml ({config_dir() / 'tune.yaml'}):\n")
        print((config_dir() / "tune.yaml").read_text())
        return 0
    try:
        import optuna  # noqa: F401
        import optuna_integration  # noqa: F401
    except ImportError as error:
        print(f"tune needs Optuna 4 or later ({error}): pip install 'pancreas_mtl[sweep]' "
              "(in a checkout: .venv/bin/pip install -e '.[sweep]')", file=sys.stderr)
        return 2
    from hydra.errors import HydraException

    from pancreas_mtl.training.tune import TuneError, run_study

    warnings.filterwarnings("ignore", category=optuna_experimental_warning())  # heartbeat, retry: stable for years
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_study(overrides)
    except Exception as error:
        # a wrong study setting (exit 2) or a refused file or value (exit 1): one line, without a traceback
        usage = (TuneError, HydraException)
        if not refusals.is_refusal(error, usage) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return refusals.report(error, usage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
