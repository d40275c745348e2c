"""The network: a ResEnc or PlainConv UNet backbone, subtype classification heads, their multi-task wrapper.

``build_model(cfg.model, plan)`` builds the network from the ``model`` config group once the plan is
known; ``nnunet_io`` reads and writes nnU-Net v2 model folders, ``nnunet_plans``
translates their plans.
"""

from pancreas_mtl.models.heads import (
    ClassificationHead,
    LesionAttentionHead,
    MultiStageHead,
    OneVsRestHead,
    SingleStageHead,
)
from pancreas_mtl.models.multitask import MultiTaskNet, build_model
from pancreas_mtl.models.plainconv_unet import PlainConvUNet
from pancreas_mtl.models.resenc_unet import ResEncUNet, UNetOutput, count_parameters

__all__ = [
    "ClassificationHead", "LesionAttentionHead", "MultiStageHead", "MultiTaskNet", "OneVsRestHead",
    "PlainConvUNet", "ResEncUNet", "SingleStageHead", "UNetOutput", "build_model", "count_parameters",
]
