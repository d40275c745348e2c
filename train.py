"""Train a multi-task network: ``python train.py experiment=panda_multistage [key=value ...]``.

Composes conf/train.yaml, prepares the dataset (discovery, checks, fingerprint, plan, preprocessing
cache), builds the network, loss, LightningModule, loggers, callbacks and trainer, and fits. The run
folder (Hydra's output dir) keeps the resolved config, the plan, the fingerprint, the checkpoints
(which carry the plan and config too) and the logs. Returns ``optimized_metric`` for sweeps.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.devices import set_tf32
from pancreas_mtl.files import save_json
from pancreas_mtl.inference.checkpoint import read_checkpoint
from pancreas_mtl.logging_utils import build_loggers
from pancreas_mtl.module import AtomicCheckpointIO, build_module
from pancreas_mtl.planning.planner import describe_plan
from pancreas_mtl.run_info import write_run_info

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


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list:
    callbacks = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if not spec or not spec.get("_target_"):
            continue
        if name == "learning_rate_monitor" and not with_logger:
            continue  # Lightning refuses it without a logger
        callback = instantiate(spec)
        if callback is not None:  # a factory may decline (step_checkpoint with every_n_train_steps=0)
            callbacks.append(callback)
    return callbacks


def train(cfg: DictConfig) -> float | None:
    """The whole run for a composed config; returns ``cfg.optimized_metric`` (None if not logged)."""
    L.seed_everything(cfg.seed, workers=True)
    log.info("run folder %s", cfg.paths.output_dir)
    write_run_info(Path(cfg.paths.output_dir))
    datamodule = prepare(cfg)
    if cfg.prepare_only:
        check_one_batch(datamodule)
        log.info("prepare_only: dataset planned, preprocessed and sampled; stopping before training")
        return None
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.plan, datamodule.subtype_counts())
    loggers = build_loggers(cfg.get("logger"), cfg.paths.output_dir, config=OmegaConf.to_container(cfg, resolve=True))
    set_tf32(cfg.module.get("tf32"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=build_callbacks(cfg, bool(loggers)),
                          plugins=[AtomicCheckpointIO()])
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        read_checkpoint(ckpt_path)  # a truncated or foreign file, or one carrying code, fails here with its path
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            wandb.finish()
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    log.info("finished: %s = %s; checkpoints in %s", cfg.optimized_metric,
             None if metric is None else f"{float(metric):.4f}", Path(cfg.paths.output_dir) / "checkpoints")
    return None if metric is None else float(metric)


@hydra.main(version_base="1.3", config_path="pkg://pancreas_mtl.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
