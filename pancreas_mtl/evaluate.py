"""``python -m pancreas_mtl.evaluate pred=DIR gt=DIR out=DIR [key=value ...]``: the same command as
``pancreas-mtl evaluate`` (keys in conf/evaluate.yaml; the scoring is pancreas_mtl.evaluation.evaluate)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pancreas_mtl.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """``pancreas-mtl evaluate`` with these ``key=value`` arguments; returns the exit code (0 done, 1 error, 2 usage)."""
    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
