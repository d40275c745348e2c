"""Hyperparameter study over training runs: ``python tune.py hparams_search=optuna [key=value ...]``.

The same command as ``pancreas-mtl tune ...`` (pancreas_mtl.commands.tune, keys in conf/tune.yaml;
README.md, Hyperparameter studies); ``--help`` prints the config.
"""

import sys

from pancreas_mtl.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
