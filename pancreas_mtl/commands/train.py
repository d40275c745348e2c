"""Train a multi-task network: ``python train.py experiment=panda_multistage [key=value ...]``, or
``pancreas-mtl train ...`` from an installed package; ``-m`` for a Hydra multirun.

Composes conf/train.yaml and runs :func:`pancreas_mtl.training.train.train`: prepares the dataset
(discovery, checks, fingerprint, plan, preprocessing cache), builds the network, loss, LightningModule,
loggers, callbacks and trainer, and fits. The run folder (Hydra's output dir) keeps the resolved config,
the plan, the fingerprint, the checkpoints (which carry the plan and config too) and the logs. Returns
the best ``optimized_metric`` for sweeps.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pancreas_mtl.commands.refusals import one_line_refusals
from pancreas_mtl.config import expand_shorthands
from pancreas_mtl.training.train import train


@hydra.main(version_base="1.3", config_path="pkg://pancreas_mtl.conf", config_name="train")
@one_line_refusals  # a refused file or key: "error: ..." and exit 1 (2 for usage), not a traceback
def run(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> float | None:
    """Hydra's main over ``sys.argv``, with shorthands such as ``pretrained=PATH`` written out first
    (``pretrained.path=PATH``; pancreas_mtl.config.expand_shorthands). sys.argv keeps the written-out form,
    so DDP's ranks 1.. (started from sys.argv) compose the same config."""
    sys.argv[1:] = expand_shorthands(sys.argv[1:])
    return run()


if __name__ == "__main__":
    main()
