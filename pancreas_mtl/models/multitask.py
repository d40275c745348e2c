"""The multi-task network: the segmentation backbone plus an optional subtype classification head.

Built from the Hydra config group ``model`` (``conf/model/default.yaml``: ``backbone`` and ``head``)
and a plan with :func:`build_model`, because the network's sizes are only known once the dataset
has been planned. Tensors are (B, C, Z, Y, X).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pancreas_mtl.models.factory import (
    UntrustedConfigError,
    backbone_factories,
    build_part,
    head_classes,
    resolve_factory,
)
from pancreas_mtl.models.heads import ClassificationHead
from pancreas_mtl.models.resenc_unet import UNetBackbone, UNetOutput

if TYPE_CHECKING:
    from pancreas_mtl.planning.plan import Plan


class MultiTaskNet(nn.Module):
    """Shared encoder-decoder with segmentation outputs and, optionally, a classification head.

    Args:
        backbone: the segmentation network (ResEncUNet or PlainConvUNet); its deep supervision
            setting decides how many segmentation outputs ``forward`` returns.
        head: a classification head called on the backbone's ``UNetOutput``, or None for
            segmentation only.
    """

    def __init__(self, backbone: UNetBackbone, head: ClassificationHead | None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def loss_kind(self) -> str | None:
        """Loss the class logits are meant for: "ce", "bce" (one-vs-rest), or None without a head."""
        return None if self.head is None else self.head.loss_kind

    def forward_unet(self, x: Tensor, lesion_mask: Tensor | None = None) -> tuple[UNetOutput, Tensor | None]:
        """The backbone's full output and the class logits (None without a head)."""
        unet = self.backbone(x)
        return unet, self.classify(unet, x, lesion_mask)

    def classify(self, unet: UNetOutput, x: Tensor, lesion_mask: Tensor | None = None) -> Tensor | None:
        """The head's class logits (B, K) from the backbone's output ``unet`` for input ``x``, handing
        the head what it declares it reads (``uses_lesion_mask``, ``uses_image``); None without a head."""
        if self.head is None:
            return None
        extra = {"image": x} if self.head.uses_image else {}
        if lesion_mask is not None and self.head.uses_lesion_mask:
            extra["lesion_mask"] = lesion_mask
        return self.head(unet, **extra)

    def forward(self, x: Tensor, lesion_mask: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
        """x (B, C, Z, Y, X) -> (segmentation logits, highest resolution first; class logits (B, K) or None).

        ``lesion_mask`` (B, 1, Z, Y, X), the true lesion of a training batch, goes to heads that use it
        (``head.uses_lesion_mask``); the others ignore it."""
        unet, class_logits = self.forward_unet(x, lesion_mask)
        return unet.seg_logits, class_logits

    def class_probabilities(self, class_logits: Tensor) -> Tensor:
        """(B, K) class logits -> probabilities summing to 1, the way the head's loss defines them."""
        if self.head is None:
            raise RuntimeError("this network has no classification head")
        return self.head.probabilities(class_logits)


def _check_network(backbone_cfg: Mapping, plan: Plan) -> None:
    """Refuse a backbone built for another network kind than the plan's (before building it): a plan's
    topology (convs per stage, no stem) only means the network it was planned for."""
    factory, _ = resolve_factory(backbone_cfg, backbone_factories(), "model.backbone")
    backbone_class = factory.__self__  # every allowed factory is a backbone's from_plan
    if backbone_class.network != plan.network:
        raise ValueError(
            f"model.backbone builds a {backbone_class.network} network ({backbone_class.__name__}), but the plan "
            f"(preset {plan.preset}) is for a {plan.network} network; the backbone and the plan must be for the same "
            "network: model/backbone=plainconv with planning=plainconv, or model/backbone=resenc with planning=M, L "
            "or small (planning=from_pretrained takes the pretrained network's kind)")


def build_model(model_cfg: Mapping | Any, plan: Plan) -> MultiTaskNet:
    """The network for a plan from the ``model`` config group, or from the copy a checkpoint carries.

    ``model_cfg.backbone`` and ``model_cfg.head`` name one of this package's classes by ``_target_``
    (``models.factory``: an allowlist, plain values only, so a config read back from a file cannot run
    code); the sizes that come from the plan are filled in here: the backbone's ``plan``, and for the
    head ``decoder_channels``, ``num_subtypes`` and (where the head takes them and the config does not
    set them) ``lesion_channel`` and ``input_channels``. A head config with ``_target_: null``
    (``model/head=none``) or no head config means segmentation only.

    Example::

        model = build_model(cfg.model, plan)   # python train.py model/head=lesion_attention
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if not isinstance(model_cfg, Mapping):
        raise UntrustedConfigError(f"model config: expected a mapping, found {type(model_cfg).__name__}")
    if not isinstance(model_cfg.get("backbone"), Mapping):
        raise ValueError("model config has no 'backbone' entry (expected e.g. conf/model/backbone/resenc.yaml)")
    _check_network(model_cfg["backbone"], plan)
    backbone = build_part(model_cfg["backbone"], backbone_factories(), "model.backbone", {"plan": plan})

    head_cfg = model_cfg.get("head")
    if head_cfg is None or (isinstance(head_cfg, Mapping) and head_cfg.get("_target_") is None):
        return MultiTaskNet(backbone, None)
    if not isinstance(head_cfg, Mapping):
        raise UntrustedConfigError(f"model.head: expected a mapping, found {type(head_cfg).__name__}")
    if plan.num_subtypes < 2:
        raise ValueError(f"the plan has {plan.num_subtypes} subtypes, a classification head needs at least 2; "
                         "use model/head=none for segmentation only")
    runtime = {"decoder_channels": backbone.decoder_channels, "num_subtypes": plan.num_subtypes,
               "input_channels": plan.num_input_channels}
    if "lesion" in plan.labels:
        runtime["lesion_channel"] = int(plan.labels["lesion"])
    return MultiTaskNet(backbone, build_part(head_cfg, head_classes(), "model.head", runtime))
