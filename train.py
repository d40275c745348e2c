"""Train a multi-task network: ``python train.py experiment=panda_multistage [key=value ...]``.

Composes conf/train.yaml, prepares the dataset (discovery, checks, fingerprint, plan, preprocessing
cache), builds the data module and, from the training issue on, the model and trainer. The run
folder (Hydra's output dir) keeps the resolved config, the plan and the fingerprint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.data.datamodule import PancreasDataModule
from pancreas_mtl.data.prepare import prepare_dataset
from pancreas_mtl.planning.plan import save_json
from pancreas_mtl.planning.planner import describe_plan

log = logging.getLogger("train")


def prepare(cfg: DictConfig) -> PancreasDataModule:
    """Dataset preparation and the data module; the plan and fingerprint are copied into the run folder."""
    prepared = prepare_dataset(cfg.data, cfg.planning, progress=cfg.data.progress)
    run_dir = Path(cfg.paths.output_dir)
    save_json(prepared.plan.to_dict(), run_dir / "plan.json")
    shutil.copy2(prepared.cache_root / "fingerprint.json", run_dir / "fingerprint.json")
    log.info("plan (%s preset):\n%s", prepared.plan.preset, describe_plan(prepared.plan))
    return PancreasDataModule(prepared, cfg.data, cfg.augmentation, seed=cfg.seed)


def check_one_batch(datamodule: PancreasDataModule) -> None:
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    log.info("first training batch: image %s, label %s, subtypes %s, cases %s", tuple(batch["image"].shape),
             tuple(batch["label"].shape), batch["subtype"].tolist(), batch["case_id"])


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    log.info("run folder %s", cfg.paths.output_dir)
    datamodule = prepare(cfg)
    check_one_batch(datamodule)
    if cfg.prepare_only:
        log.info("prepare_only: dataset planned, preprocessed and sampled; stopping before training")
        return None
    log.warning("training is not part of this release yet (the model and trainer arrive with the training "
                "issue); the dataset is prepared and cached in %s", cfg.data.cache_dir)
    return None


if __name__ == "__main__":
    main()
