"""Where and how the subtype heads pool decoder features: global pooling, pooling over a region the
network predicts (or the true lesion, in training), lesion core / rim / ring maps and radiomics-style
image statistics under a lesion map. Tensors are (B, C, Z, Y, X); maps are (B, 1, Z, Y, X) in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pancreas_mtl.planning.plan import LESION_LABEL

POOLINGS = ("max", "avg", "avgmax")
REGIONS = ("patch", "pancreas", "lesion")
MIN_GUIDE = 0.05  # a guide whose largest value is below this finds no region: the whole patch is pooled


def global_pool(features: Tensor, pool: str) -> Tensor:
    """features (B, C, Z, Y, X) -> (B, C) by global max, average, or their mean ("avgmax")."""
    flat = features.flatten(2)
    if pool == "max":
        return flat.amax(dim=2)
    if pool == "avg":
        return flat.mean(dim=2)
    return 0.5 * (flat.amax(dim=2) + flat.mean(dim=2))


def region_pool(features: Tensor, guide: Tensor, pool: str) -> Tensor:
    """features (B, C, z, y, x) pooled over a region: ``guide`` (B, 1, Z, Y, X) in [0, 1] at any
    resolution is area-resampled to the features' grid; "avg" is the guide-weighted mean, "max" the
    maximum over the voxels whose guide is at least half the sample's largest, "avgmax" their mean. A
    sample whose guide stays below ``MIN_GUIDE`` everywhere is pooled over the whole patch."""
    weights = F.interpolate(guide.to(features.dtype), size=features.shape[2:], mode="area").flatten(1)   # (B, N)
    peak = weights.amax(dim=1, keepdim=True)
    found = peak >= MIN_GUIDE
    flat = features.flatten(2)
    weights = torch.where(found, weights, torch.ones_like(weights))
    pooled = []
    if pool in ("avg", "avgmax"):
        pooled.append(_weighted_mean(flat, weights))
    if pool in ("max", "avgmax"):
        inside = torch.where(found, weights >= 0.5 * peak, torch.ones_like(weights, dtype=torch.bool))
        pooled.append(flat.masked_fill(~inside[:, None], torch.finfo(flat.dtype).min).amax(dim=2))
    return pooled[0] if len(pooled) == 1 else 0.5 * (pooled[0] + pooled[1])


def lesion_regions(lesion: Tensor) -> Tensor:
    """A lesion map (B, 1, Z, Y, X) in [0, 1] -> (B, 3, Z, Y, X): its core (eroded by one voxel), its
    rim (the lesion less the core) and the ring of one voxel around it (dilation less the lesion).
    Erosion and dilation are 3 x 3 x 3 min and max filters, so soft maps stay soft."""
    dilated = F.max_pool3d(lesion, kernel_size=3, stride=1, padding=1)
    core = -F.max_pool3d(-lesion, kernel_size=3, stride=1, padding=1)
    return torch.cat([core, (lesion - core).clamp_min(0.0), (dilated - lesion).clamp_min(0.0)], dim=1)


def jitter_mask(mask: Tensor, voxels: int) -> Tensor:
    """mask (B, 1, Z, Y, X) in [0, 1] -> each sample eroded, kept or dilated (equal chance) by
    ``voxels`` voxels (cubic max / min filters)."""
    if voxels <= 0:
        return mask
    size = 2 * voxels + 1
    dilated = F.max_pool3d(mask, kernel_size=size, stride=1, padding=voxels)
    eroded = -F.max_pool3d(-mask, kernel_size=size, stride=1, padding=voxels)
    choice = torch.randint(0, 3, (mask.shape[0], 1, 1, 1, 1), device=mask.device)
    return torch.where(choice == 0, eroded, torch.where(choice == 1, mask, dilated))


IMAGE_STATISTICS = 7  # per input channel, see lesion_image_statistics


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """values (B, C, N), weights (B, N) >= 0 -> (B, C); uniform where the weights sum to ~0."""
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 1e-6, weights / total.clamp_min(1e-6), torch.full_like(weights, 1 / weights.shape[1]))
    return torch.einsum("bn,bcn->bc", weights, values)


def lesion_image_statistics(image: Tensor, lesion: Tensor) -> Tensor:
    """The input under a lesion map, as a radiologist reads it: image (B, C, Z, Y, X) and lesion map
    (B, 1, Z, Y, X) in [0, 1] -> (B, 7 * C) float32, per channel: the lesion's mean and standard
    deviation, core minus rim (an enhancing wall), lesion minus the ring around it (attenuation against
    the neighbouring tissue), and the mean gradient magnitude (per voxel) over the lesion, its core and
    its rim (septa and texture versus a smooth interior). Regions as in ``lesion_regions``."""
    image = image.float()
    batch, channels = image.shape[:2]
    core, rim, ring = lesion_regions(lesion.float()).flatten(2).unbind(dim=1)   # each (B, N)
    whole = lesion.float().flatten(1)
    gradient = torch.stack(torch.gradient(image, dim=(2, 3, 4)), dim=0).pow(2).sum(dim=0).sqrt().flatten(2)
    values = image.flatten(2)
    mean = _weighted_mean(values, whole)
    spread = (_weighted_mean(values.pow(2), whole) - mean.pow(2)).clamp_min(0.0).add(1e-6).sqrt()
    features = [mean, spread, _weighted_mean(values, core) - _weighted_mean(values, rim),
                mean - _weighted_mean(values, ring), _weighted_mean(gradient, whole),
                _weighted_mean(gradient, core), _weighted_mean(gradient, rim)]
    return torch.stack(features, dim=2).reshape(batch, channels * IMAGE_STATISTICS)



class RegionGuide(nn.Module):
    """The map a head pools under (B, 1, Z, Y, X) in [0, 1], from the full-resolution segmentation logits.

    ``lesion``: the predicted lesion probability; ``pancreas``: the probability of pancreas or lesion
    (1 - background); ``patch``: no map (None, the whole patch). In training a share ``truth_guidance``
    of the samples follow the true lesion mask instead (``lesion`` only), eroded, kept or dilated by
    ``truth_jitter`` voxels, so the classifier learns the lesion's features before the segmentation
    finds lesions, without learning its exact boundary (no prediction has it).

    Args:
        region: "patch", "pancreas" or "lesion".
        lesion_channel: channel of the segmentation logits that is the lesion.
        truth_guidance: share of training samples guided by the true lesion, in [0, 1].
        truth_jitter: voxels by which a truth-guided mask is eroded or dilated (0: as it is).
        detach: keep the classification loss from reshaping the segmentation through the map.
    """

    def __init__(self, region: str = "lesion", lesion_channel: int = LESION_LABEL, truth_guidance: float = 0.0,
                 truth_jitter: int = 0, detach: bool = True):
        super().__init__()
        if region not in REGIONS:
            raise ValueError(f"unknown pooling region {region!r}, expected one of {REGIONS}")
        if not 0.0 <= truth_guidance <= 1.0:
            raise ValueError(f"truth_guidance is a share of samples in [0, 1], got {truth_guidance}")
        if truth_guidance > 0 and region != "lesion":
            raise ValueError(f"truth_guidance follows the true lesion: it needs region 'lesion', got {region!r}")
        if truth_jitter < 0:
            raise ValueError(f"truth_jitter is a number of voxels >= 0, got {truth_jitter}")
        self.region = region
        self.lesion_channel = int(lesion_channel)
        self.truth_guidance = float(truth_guidance)
        self.truth_jitter = int(truth_jitter)
        self.detach = bool(detach)

    @property
    def uses_lesion_mask(self) -> bool:
        return self.truth_guidance > 0

    def predicted(self, seg_logits: Tensor) -> Tensor | None:
        """seg_logits (B, K, Z, Y, X) -> the predicted region's probability (B, 1, Z, Y, X), float32."""
        if self.region == "patch":
            return None
        if seg_logits.shape[1] <= self.lesion_channel:
            raise ValueError(f"segmentation logits have {seg_logits.shape[1]} channels, the lesion is channel "
                             f"{self.lesion_channel}")
        probabilities = seg_logits.float().softmax(dim=1)
        if self.region == "lesion":
            probability = probabilities[:, self.lesion_channel:self.lesion_channel + 1]
        else:
            probability = 1.0 - probabilities[:, :1]
        return probability.detach() if self.detach else probability

    def forward(self, seg_logits: Tensor, lesion_mask: Tensor | None = None) -> Tensor | None:
        """The map to pool under: predicted, or for a ``truth_guidance`` share of the samples in training
        the true ``lesion_mask`` (B, 1, Z, Y, X); None for the whole patch."""
        probability = self.predicted(seg_logits)
        if probability is None or lesion_mask is None or not self.training or self.truth_guidance <= 0:
            return probability
        if lesion_mask.shape[2:] != probability.shape[2:]:
            raise ValueError(f"lesion_mask has spatial shape {tuple(lesion_mask.shape[2:])}, the segmentation "
                             f"logits {tuple(probability.shape[2:])}")
        chosen = torch.rand(probability.shape[0], device=probability.device) < self.truth_guidance
        truth = jitter_mask(lesion_mask.to(probability.dtype), self.truth_jitter)
        return torch.where(chosen.view(-1, 1, 1, 1, 1), truth, probability)

    def extra_repr(self) -> str:
        return f"region={self.region}, truth_guidance={self.truth_guidance}, truth_jitter={self.truth_jitter}"
