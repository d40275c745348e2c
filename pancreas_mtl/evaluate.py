"""``python -m pancreas_mtl.evaluate pred=DIR gt=DIR out=DIR [...]``: see pancreas_mtl.evaluation.evaluate."""

import sys

from pancreas_mtl.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
