"""Every subtype head learns on a tiny problem: the network and a head trained together from scratch with
the multi-task loss on patches where the lesion is about 1% of the voxels, and the subtype is in the
lesion's texture only (as on the synthetic set). The training cross-entropy must fall well below ln 3
(chance for three subtypes), and the head must classify fresh patches guided by the network's own
lesion prediction, as at inference."""

from __future__ import annotations

import math

import pytest
import torch

from pancreas_mtl.losses import ClassificationLoss, MultiTaskLoss, SegmentationLoss
from pancreas_mtl.models import LesionAttentionHead, MultiStageHead, MultiTaskNet, OneVsRestHead, SingleStageHead
from tests.conf_values import classification_loss_values, head_values, segmentation_loss_values
from tests.test_models import PATCH, tiny_net

# each head as conf/model/head/ configures it (pooling over the lesion, truth guidance, image statistics)
HEADS = {"single_stage": SingleStageHead, "multistage": MultiStageHead, "ovr": OneVsRestHead,
         "lesion_attention": LesionAttentionHead}
STEPS = 150


def tiny_problem(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image (B, 1, *PATCH), label (B, 1, *PATCH) 0/1/2, subtype (B,)): a pancreas slab with one ellipsoid
    lesion (about 1% of the patch) that is dark and smooth (0), dark with bright septa (1) or dark and
    mottled (2); the lesion's position varies."""
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in PATCH), indexing="ij")
    images, labels = [], []
    subtypes = torch.arange(batch) % 3
    for subtype in subtypes.tolist():
        centre = [int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in ((5, 11), (10, 22), (10, 22))]
        pancreas = (y - centre[1]).abs().le(7) & (x - centre[2]).abs().le(9) & (z - centre[0]).abs().le(4)
        lesion = ((z - centre[0]) / 2.2) ** 2 + ((y - centre[1]) / 4.0) ** 2 + ((x - centre[2]) / 4.0) ** 2 <= 1
        image = 0.25 * torch.randn(PATCH, generator=generator) + pancreas * 1.0
        texture = torch.zeros(PATCH)
        if subtype == 1:
            texture = ((x - centre[2]).remainder(3) == 0) * 1.6
        elif subtype == 2:
            texture = 0.9 * torch.randn(PATCH, generator=generator)
        image = torch.where(lesion, -0.8 + texture + 0.25 * torch.randn(PATCH, generator=generator), image)
        label = torch.where(lesion, 2, pancreas.long())
        images.append(image[None])
        labels.append(label[None])
    return torch.stack(images), torch.stack(labels), subtypes


def train_tiny(name: str, seed: int = 0) -> tuple[list[float], float]:
    """Train a tiny network with the head ``name``; returns the per-step subtype cross-entropy (from the
    head's probabilities, whatever its loss) and the accuracy on fresh patches in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = tiny_net(features=(8, 16, 16, 16))   # 8 full-resolution channels: single_stage reads only those
    head = HEADS[name](backbone.decoder_channels, 3, **head_values(name, dropout=0.0))
    model = MultiTaskNet(backbone, head)
    kind = head.loss_kind
    loss = MultiTaskLoss(SegmentationLoss(**segmentation_loss_values()),
                         ClassificationLoss(**classification_loss_values(kind=kind, class_weights=None)),
                         cls_weight=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    cross_entropies = []
    model.train()
    for _ in range(STEPS):
        image, label, subtype = tiny_problem(generator, 6)
        seg_logits, class_logits = model(image, label == 2)
        terms = loss(seg_logits, class_logits, label, subtype)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            probabilities = head.probabilities(class_logits.detach())
            cross_entropies.append(float(-probabilities[torch.arange(6), subtype].clamp_min(1e-8).log().mean()))
    model.eval()
    with torch.no_grad():
        image, label, subtype = tiny_problem(generator, 30)
        _, class_logits = model(image)
        accuracy = float((class_logits.argmax(dim=1) == subtype).float().mean())
    return cross_entropies, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_learns_the_subtype_on_a_tiny_problem(name):
    cross_entropies, accuracy = train_tiny(name)
    start = sum(cross_entropies[:10]) / 10
    end = sum(cross_entropies[-20:]) / 20
    assert start > 0.8 * math.log(3)          # it starts at chance ...
    assert end < 0.5 * math.log(3), f"{name}: training CE {start:.3f} -> {end:.3f}"   # ... and learns
    assert accuracy >= 0.8, f"{name}: accuracy on fresh patches (predicted lesion guides) {accuracy:.2f}"
