"""The LightningModule: multi-task training steps, whole-case sliding-window validation, optimizers.

One case's path through validation: the whole preprocessed case (1, C, Z, Y, X) goes through the
:class:`~pancreas_mtl.inference.predictor.Predictor` that ``predict.py`` uses, with the settings of a
``conf/inference`` preset (``validation`` by default: step 0.5 of the patch, Gaussian importance
weights with sigma 1/8 of the patch, no mirroring; ``inference@module.validation=fast`` picks another);
the probabilities' argmax gives the label map, scored with whole-pancreas and lesion Dice; the
classification head runs on the same windows and its per-window subtype probabilities are pooled by
:func:`~pancreas_mtl.inference.sliding_window.aggregate_window_predictions`. Scores go to the loggers
as ``val/*`` at the end of the epoch.
The checkpoint carries the plan and the resolved config (``checkpoint["pancreas_mtl"]``), so
:func:`~pancreas_mtl.inference.checkpoint.load_network` rebuilds the network from the file alone.

Resuming (``trainer.fit(ckpt_path=...)``) continues the run the checkpoint stopped: a checkpoint whose
network differs from this run's is refused with what differs, and the dropout masks of training step
N are drawn from a generator seeded by (seed, N, rank), not from torch's global stream, so a run
resumed from any step draws the masks the uninterrupted run would have (the patches resume through
the data module's state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from pancreas_mtl import __version__
from pancreas_mtl.config import plain
from pancreas_mtl.devices import set_tf32
from pancreas_mtl.evaluation.combined import check_weights, combined_score
from pancreas_mtl.evaluation.metrics import ClassificationMetrics, lesion_dice, whole_pancreas_dice
from pancreas_mtl.evaluation.selection import shown_slice
from pancreas_mtl.config import config_differences
from pancreas_mtl.inference.checkpoint import MODEL_PREFIX, state_mismatch
from pancreas_mtl.inference.predictor import Prediction, Predictor
from pancreas_mtl.inference.settings import InferenceSettings
from pancreas_mtl.training.validation_media import (
    format_confusion_matrix,
    log_confusion_matrix,
    log_image,
    log_validation_cases,
    render_overlay,
    validation_slice,
    write_png,
)
from pancreas_mtl.models.multitask import MultiTaskNet, build_model
from pancreas_mtl.training.fine_tuning import FineTuning, parameter_groups, scale_learning_rates
from pancreas_mtl.training.optim import as_factory
from pancreas_mtl.planning.plan import LESION_LABEL, Plan

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")
LOGGED_TRAIN_TERMS = ("loss", "seg", "dice", "ce", "cls")


# --- the module -------------------------------------------------------------------------------------

class MultiTaskModule(L.LightningModule):
    """Trains a :class:`MultiTaskNet` with a :class:`MultiTaskLoss`; validates on whole cases.

    Args:
        model: the network (``build_model(cfg.model, plan)``).
        loss: the training objective; called as ``loss(seg_logits, class_logits, label, subtype)``.
        plan: the experiment plan (or its dict); saved in every checkpoint.
        optimizer: ``params -> Optimizer`` (a Hydra partial such as conf/optimizer/sgd_nesterov.yaml), or its config.
        scheduler: ``(optimizer, total_steps) -> LRScheduler`` stepped every optimizer step
            (conf/scheduler/), its config, or None for a constant lr.
        validation: how validation predicts a case: :class:`InferenceSettings`, or the mapping of a
            composed ``conf/inference`` preset (``module.validation``; keys it leaves out are
            ``accurate``'s). How often validation runs is the Trainer's ``check_val_every_n_epoch``.
        num_overlays: the first N validation cases drawn as PNG overlays each validation epoch (run
            folder, TensorBoard); W&B gets the N worst cases instead, with mask layers.
        save_overlays: also write the overlays under ``<run folder>/overlays``.
        nonfinite_loss: what a NaN/inf training loss does: ``skip`` the batch (training_step returns None:
            no backward, the optimizer steps with no gradients so weights and momenta stay as they were,
            the lr schedule moves on; under DDP a zero loss whose gradients are dropped) or ``stop`` the
            run with an error naming the cases. Under DDP the decision is all-reduced: when any rank's
            loss is non-finite, every rank skips (or stops at) that step.
        compile: ``torch.compile`` the backbone and head in place (state-dict keys unchanged).
        compile_kwargs: passed to ``nn.Module.compile`` (mode, dynamic, ...).
        channels_last: channels-last 3D weights and inputs (faster convolutions on recent GPUs).
        tf32: TF32 matmuls and convolutions on CUDA (None: leave torch's setting).
        combined_metric: ``{metric: weight}`` over ``whole_pancreas_dice``, ``lesion_dice``, ``macro_f1``,
            ``macro_auroc``, ``balanced_accuracy``; ``val/combined`` is their weighted mean over the defined
            ones (:func:`~pancreas_mtl.evaluation.combined.combined_score`, the rule the studies rank by).
        config: the resolved run config (plain containers), saved in every checkpoint.

    Every setting is ``conf/module/default.yaml``'s key of the same name (``build_module`` passes them);
    none has a default here, so the YAML is their one home.
    """

    def __init__(self, model: MultiTaskNet, loss: nn.Module, plan: Plan | Mapping,
                 optimizer: Callable | Mapping, *, validation: InferenceSettings | Mapping,
                 scheduler: Callable | Mapping | None, num_overlays: int, save_overlays: bool, nonfinite_loss: str,
                 compile: bool, compile_kwargs: Mapping | None, channels_last: bool, tf32: bool | None,
                 combined_metric: Mapping, config: Mapping | None = None):
        super().__init__()
        settings = (validation if isinstance(validation, InferenceSettings)
                    else InferenceSettings.from_config(plain(validation)))
        validation = settings.to_config()  # plain values for the saved hyperparameters
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        combined_metric = check_weights(plain(combined_metric), "this run's config")
        compile_kwargs = dict(plain(compile_kwargs) or {})
        self.save_hyperparameters(ignore=["model", "loss", "plan", "optimizer", "scheduler", "config"])
        self.model = model
        self.loss = loss
        self.plan = plan if isinstance(plan, Plan) else Plan.from_dict(dict(plan))
        self.config = plain(config)
        self.optimizer_factory = as_factory(optimizer)
        self.scheduler_factory = as_factory(scheduler)
        if self.optimizer_factory is None:
            raise ValueError("an optimizer is required (e.g. conf/optimizer/sgd_nesterov.yaml)")
        self.validation = settings
        self.lesion_channel = int(self.plan.labels.get("lesion", LESION_LABEL))
        self.nonfinite_steps = 0
        self._drop_gradients = False
        self.last_validation: dict[str, Any] = {}
        self._val_cases: list[dict[str, Any]] = []
        self._model_configured = False
        self._predictor: Predictor | None = None
        self.fine_tuning: FineTuning | None = None  # a warm start's parameter groups (train.py sets it)

    @property
    def memory_format(self) -> torch.memory_format | None:
        return torch.channels_last_3d if self.hparams.channels_last else None

    # --- set-up -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if torch.cuda.is_available():
            set_tf32(self.hparams.tf32)

    def configure_model(self) -> None:
        if self._model_configured:
            return
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if self.hparams.compile:
            # compiled in place: the state-dict keys (checkpoints) stay those of the plain modules
            self.model.backbone.compile(**self.hparams.compile_kwargs)
            if self.model.head is not None:
                self.model.head.compile(**self.hparams.compile_kwargs)
        self._model_configured = True

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=parameter_groups(self.model, self.fine_tuning))
        scale_learning_rates(optimizer)  # pretrained.lr_scale (training.fine_tuning), before the schedule
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}

    # --- training -----------------------------------------------------------------------------------

    def forward(self, image: Tensor, lesion_mask: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
        """image (B, C, Z, Y, X) [, true lesion mask (B, 1, Z, Y, X) for heads that use it in training]
        -> (segmentation logits, highest resolution first; class logits (B, K) or None)."""
        if self.memory_format is not None:
            image = image.contiguous(memory_format=self.memory_format)
        return self.model(image, lesion_mask)

    def step_seed(self) -> int:
        """The seed of this training step's random draws (dropout): a function of the run's seed, the
        global step and the rank only, so it is the same after resuming."""
        run_seed = int((self.config or {}).get("seed") or 0) % 2**63
        entropy = [run_seed, int(self.global_step), int(self.global_rank)]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the global stream stays as it was
            torch.manual_seed(self.step_seed())
            seg_logits, class_logits = self(batch["image"], batch["label"] == self.lesion_channel)
        terms = self.loss(seg_logits, class_logits, batch["label"], batch.get("subtype"))
        finite = bool(torch.isfinite(terms["loss"]))  # one device sync per step; logging needs one anyway
        # Every process must take the same branch: under DDP a rank that skips the backward pass while
        # the others run it leaves them waiting for its gradients. One all-reduce of a flag per step.
        if self.trainer.world_size > 1:
            finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if not finite:
            return self._nonfinite_loss(terms, batch, batch_idx)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch_size)
        self.log_dict({f"train/{name}": terms[name].detach() for name in LOGGED_TRAIN_TERMS if name != "loss"},
                      on_step=True, on_epoch=True, batch_size=batch_size)
        return terms["loss"]

    def _nonfinite_loss(self, terms: dict[str, Tensor], batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        values = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items())
        where = (f"non-finite training loss at epoch {self.current_epoch}, global step {self.global_step}, "
                 f"batch {batch_idx}, cases {list(batch.get('case_id', []))}: {values}")
        world_size = self._trainer.world_size if self._trainer is not None else 1  # 1 outside a Trainer
        if world_size > 1:
            where = f"rank {self.global_rank}: " + where
            if torch.isfinite(terms["loss"]):
                where += " (finite here; another rank's loss was not, and all ranks take the same step)"
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(f"{where}. module.nonfinite_loss=stop ends the run; "
                                     "module.nonfinite_loss=skip drops such batches instead")
        self.nonfinite_steps += 1
        log.warning("%s; batch skipped (module.nonfinite_loss=skip, %d so far)", where, self.nonfinite_steps)
        if world_size <= 1:
            return None
        # Lightning refuses None under DDP, and DDP expects a gradient for every weight: a zero loss over
        # the weights (not the non-finite one: NaN * 0 is NaN) gives zero gradients to all-reduce, which
        # on_before_optimizer_step then removes, so the optimizer leaves weights and momenta as they were.
        self._drop_gradients = True
        return sum((parameter * 0).sum() for parameter in self.parameters() if parameter.requires_grad)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_gradients:
            optimizer.zero_grad(set_to_none=True)  # torch's optimizers skip weights without a gradient
            self._drop_gradients = False

    # --- validation ---------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._predictor = None  # a fresh predictor each epoch: no out-of-memory fallback carried over

    def predict_case(self, image: Tensor, case_id: str | None = None) -> Prediction:
        """(1, C, Z, Y, X) preprocessed case -> :class:`Prediction`: probabilities (K, Z, Y, X) on the plan's
        grid and subtype probabilities (K_subtypes,) or None, by ``predict.py``'s predictor with the
        ``validation`` settings (under the Trainer's autocast, if any; its window cap too, naming
        ``case_id``)."""
        if self._predictor is None or self._predictor.device != image.device:
            self._predictor = Predictor([self.model], self.plan, self.validation, device=image.device,
                                        precision="fp32", tf32=False, channels_last=self.hparams.channels_last)
        return self._predictor.predict_preprocessed(image[0], case_id)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = batch.get("split", "val")
        prediction = self.predict_case(batch["image"], batch["case_id"][0])
        probabilities = prediction.subtype_probabilities
        pred = prediction.probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()  # (Z, Y, X)
        true = batch["label"][0, 0].cpu().numpy()                                     # (Z, Y, X)
        self._val_cases.append({
            "case_id": batch["case_id"][0],
            "whole_pancreas_dice": whole_pancreas_dice(pred, true),
            "lesion_dice": lesion_dice(pred, true, lesion_label=self.lesion_channel),
            "subtype": int(batch["subtype"][0]),
            "probabilities": None if probabilities is None else probabilities.cpu(),
            "split": split,
            # one small axial slice per case, so the epoch's worst cases can be drawn at its end
            "slice": (validation_slice(batch["image"][0, 0], true, pred, self.lesion_channel)
                      if split == "val" and int(self.hparams.num_overlays) > 0 and not self.trainer.sanity_checking
                      else None),
        })
        if split == "val" and batch_idx < int(self.hparams.num_overlays) and not self.trainer.sanity_checking:
            self._overlay(batch["image"][0, 0].float().cpu().numpy(), true, pred, batch["case_id"][0], batch_idx)

    def _gathered(self, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The per-case results of every process, each case once, in case-id order (so the metrics do not
        depend on the number of processes). Lightning's distributed sampler pads the validation set with
        repeated cases so every rank gets as many: the repeats are dropped here."""
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, cases)
            cases = [case for rank_cases in per_rank for case in rank_cases or []]
        unique = {(case.get("split", "val"), case["case_id"]): case for case in reversed(cases)}  # first of repeats
        return [unique[key] for key in sorted(unique)]

    def on_validation_epoch_end(self) -> None:
        gathered, self._val_cases = self._gathered(self._val_cases), []
        by_split: dict[str, list[dict[str, Any]]] = {}
        for case in gathered:
            by_split.setdefault(case["split"], []).append(case)
        inner = by_split.get("inner")
        if inner:
            # the inner validation split (training cases never trained on) chooses the checkpoint
            inner_metrics, _ = self.split_metrics(inner)
            self.log_dict({f"inner/{name}": value for name, value in inner_metrics.items()}, batch_size=1)
            self.log("select/combined", inner_metrics["combined"], batch_size=1)
        cases = by_split.get("val", [])
        if not cases:
            return
        metrics, confusion = self.split_metrics(cases)
        if not inner:
            self.log("select/combined", metrics["combined"], batch_size=1)
        # the same values on every rank (all computed from the gathered cases): no sync needed
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, batch_size=1)
        self.last_validation = {"metrics": metrics, "confusion_matrix": confusion,
                                "cases": [{k: v for k, v in c.items() if k not in ("probabilities", "slice")}
                                          for c in cases]}
        if inner:
            self.last_validation["inner_metrics"] = inner_metrics
        if confusion is not None and not self.trainer.sanity_checking:
            names = [f"subtype{k}" for k in range(confusion.shape[0])]
            self.print(f"validation epoch {self.current_epoch}: subtype confusion matrix ({len(cases)} cases)\n"
                       + format_confusion_matrix(confusion, names))
            if self.global_rank == 0:
                log_confusion_matrix(self.loggers, "val/confusion_matrix", confusion, self.global_step, names)
        if not self.trainer.sanity_checking and self.global_rank == 0:
            log_validation_cases(self.loggers, cases, self.global_step, self.current_epoch, self.plan.labels,
                                 int(self.hparams.num_overlays))

    def split_metrics(self, cases: list[dict[str, Any]]) -> tuple[dict[str, float], Tensor | None]:
        """Mean Dice, subtype scores and ``combined`` over one split's cases, and the subtype confusion
        matrix (None without a head)."""
        dice = torch.tensor([[c["whole_pancreas_dice"], c["lesion_dice"]] for c in cases], dtype=torch.float64)
        metrics = {"whole_pancreas_dice": float(dice[:, 0].mean()), "lesion_dice": float(dice[:, 1].mean())}
        confusion = None
        if cases[0]["probabilities"] is not None:
            probabilities = torch.stack([c["probabilities"] for c in cases])
            subtypes = torch.tensor([c["subtype"] for c in cases])
            scores_tracker = ClassificationMetrics(num_classes=probabilities.shape[1])
            scores_tracker.update(probabilities, subtypes)
            scores = scores_tracker.compute()
            metrics.update({"macro_f1": scores["macro_f1"], "balanced_accuracy": scores["balanced_accuracy"],
                            "macro_auroc": scores["macro_auroc"]})
            metrics.update({f"auroc_{k}": scores[f"auroc_{k}"] for k in range(probabilities.shape[1])})
            confusion = scores_tracker.confusion_matrix()
        metrics["combined"] = self.combined_metric(metrics)
        return metrics, confusion

    def combined_metric(self, metrics: Mapping[str, float]) -> float:
        """Weighted mean of the configured metrics that are defined (not NaN, present); NaN if none is."""
        return combined_score(metrics, self.hparams.combined_metric)

    def _overlay(self, image: np.ndarray, true: np.ndarray, pred: np.ndarray, case_id: str, index: int) -> None:
        """Best effort: an axial slice through the lesion as PNG, to the run folder and image-capable loggers."""
        if self.global_rank != 0:
            return
        try:
            z = shown_slice(true, pred, self.lesion_channel)
            rgb = render_overlay(image[z], true[z], pred[z], self.lesion_channel)
            if self.hparams.save_overlays:
                folder = Path(self.trainer.default_root_dir) / "overlays"
                write_png(rgb, folder / f"epoch{self.current_epoch:04d}_{case_id}.png")
            log_image(self.loggers, f"val/overlay_{index}", rgb, self.global_step)
        except Exception as error:  # noqa: BLE001 - a picture is never a reason to stop training
            log.warning("could not draw the validation overlay of %s: %s: %s", case_id, type(error).__name__, error)

    # --- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pancreas_mtl"] = {"plan": self.plan.to_dict(), "config": self.config, "version": __version__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads the weights: a checkpoint of another plan or head is refused, naming
        what differs, instead of failing with torch's list of size mismatches."""
        state = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint.get("state_dict", {}).items()
                 if key.startswith(MODEL_PREFIX)}
        mismatch = state_mismatch(self.model.state_dict(), state)
        if not mismatch:
            return
        saved = checkpoint.get("pancreas_mtl") or {}
        differences = []
        if saved.get("plan"):
            differences += [f"plan.{line}" for line in config_differences(self.plan.to_dict(), saved["plan"])]
        if (saved.get("config") or {}).get("model") and (self.config or {}).get("model"):
            differences += [f"model.{line}" for line in config_differences(self.config["model"],
                                                                             saved["config"]["model"])]
        raise ValueError(
            "the checkpoint holds another network than this run builds, so it cannot be resumed or loaded "
            "here; resume with the checkpoint's own plan and model config (its run folder's .hydra/config.yaml)."
            + ("\n this run vs the checkpoint:\n  " + "\n  ".join(differences) if differences else "")
            + "\n weights:\n  " + "\n  ".join(mismatch))


def build_module(cfg: Mapping | DictConfig, plan: Plan, subtype_counts: Mapping | Sequence | None) -> MultiTaskModule:
    """Network, loss and module from the run config (groups ``model``, ``loss``, ``optimizer``, ``scheduler``,
    ``module``), for a plan and the training split's subtype counts (class weights of the loss)."""
    from hydra.utils import instantiate

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    model = build_model(cfg.model, plan)
    loss_overrides: dict[str, Any] = {}
    if "lesion" in plan.labels:  # the plan's, as build_model gives the head its lesion_channel
        loss_overrides["lesion_label"] = int(plan.labels["lesion"])
    if cfg.loss.get("cls_loss") is not None:
        loss_overrides["cls_loss"] = {"subtype_counts": plain(subtype_counts)}
        if model.loss_kind is not None and model.loss_kind != cfg.loss.cls_loss.get("kind"):
            raise ValueError(f"the head's logits are meant for {model.loss_kind!r} but loss.cls_loss.kind is "
                             f"{cfg.loss.cls_loss.get('kind')!r}; use loss=ovr with model/head=ovr")
    loss = instantiate(cfg.loss, **loss_overrides)
    return MultiTaskModule(model=model, loss=loss, plan=plan, optimizer=cfg.optimizer,
                           scheduler=cfg.get("scheduler"), config=OmegaConf.to_container(cfg, resolve=True),
                           **plain(cfg.get("module") or {}))
