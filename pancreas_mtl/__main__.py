"""``python -m pancreas_mtl <command> [key=value ...]``: the same as ``pancreas-mtl <command> ...``."""

import sys

from pancreas_mtl.commands.cli import main

sys.exit(main())
