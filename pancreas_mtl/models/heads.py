"""Lesion subtype classification heads on the backbone's decoder features.

Every head is built as ``Head(decoder_channels, num_subtypes, **knobs)`` and called as
``head(unet_output) -> class logits (B, num_subtypes)``, where ``unet_output`` is the backbone's
:class:`~pancreas_mtl.models.resenc_unet.UNetOutput` (decoder features lowest resolution first,
segmentation logits highest resolution first). ``decoder_channels`` are the channels of
``unet_output.decoder_features`` in that order. A head declares the loss its logits are meant for
(``loss_kind``: "ce" for softmax cross-entropy, "bce" for one-vs-rest binary cross-entropy) and turns
logits into class probabilities with ``probabilities``. Segmentation only is no head at all (None).

Adding a head: one class here with that constructor and call, plus ``conf/model/head/<name>.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pancreas_mtl.models.resenc_unet import UNetOutput
from pancreas_mtl.planning.plan import LESION_LABEL

POOLINGS = ("max", "avg", "avgmax")
LESION_POOLINGS = ("mean", "meanmax", "regions")


def global_pool(features: Tensor, pool: str) -> Tensor:
    """features (B, C, Z, Y, X) -> (B, C) by global max, average, or their mean ("avgmax")."""
    flat = features.flatten(2)
    if pool == "max":
        return flat.amax(dim=2)
    if pool == "avg":
        return flat.mean(dim=2)
    return 0.5 * (flat.amax(dim=2) + flat.mean(dim=2))


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


def _check_pool(pool: str) -> str:
    if pool not in POOLINGS:
        raise ValueError(f"unknown pooling {pool!r}, expected one of {POOLINGS}")
    return pool


def classifier_mlp(in_features: int, out_features: int, hidden: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """Dropout -> Linear(in, out) when ``hidden`` is 0, else Dropout -> Linear(in, hidden) ->
    LeakyReLU -> Dropout -> Linear(hidden, out)."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.LeakyReLU(1e-2),
                         nn.Dropout(dropout), nn.Linear(hidden, out_features))


class ClassificationHead(nn.Module):
    """Base class: holds the sizes every head needs and the softmax probabilities of CE heads.

    Args:
        decoder_channels: channels of each decoder stage's output, lowest resolution first.
        num_subtypes: classes to predict.
    """

    loss_kind = "ce"
    uses_lesion_mask = False  # True: forward(unet, lesion_mask) takes the true lesion in training
    uses_image = False        # True: forward(..., image=) also reads the network's input

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int):
        super().__init__()
        if num_subtypes < 2:
            raise ValueError(f"a classification head needs at least 2 subtypes, got {num_subtypes}; "
                             "use model/head=none for segmentation only")
        if not decoder_channels:
            raise ValueError("a classification head needs at least one decoder stage")
        self.decoder_channels = [int(c) for c in decoder_channels]
        self.num_subtypes = int(num_subtypes)

    def probabilities(self, logits: Tensor) -> Tensor:
        """logits (B, K) -> class probabilities (B, K) summing to 1."""
        return logits.float().softmax(dim=-1)


class SingleStageHead(ClassificationHead):
    """Global pooling on one decoder stage (default the last, full resolution) and a classifier.

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        stage: index into the decoder stages, lowest resolution first (-1: full resolution).
        pool: "max" (PANDA), "avg" or "avgmax".
        hidden: hidden units of the classifier, 0 for a single linear layer.
        dropout: dropout before each linear layer of the classifier.
    """

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, stage: int = -1, pool: str = "max",
                 hidden: int = 0, dropout: float = 0.0):
        super().__init__(decoder_channels, num_subtypes)
        self.stage = range(len(self.decoder_channels))[stage]  # IndexError names a bad index
        self.pool = _check_pool(pool)
        self.classifier = classifier_mlp(self.decoder_channels[self.stage], num_subtypes, hidden, dropout)

    def forward(self, unet: UNetOutput) -> Tensor:
        """unet: the backbone's output -> class logits (B, num_subtypes)."""
        return self.classifier(global_pool(unet.decoder_features[self.stage], self.pool))


class StagePooling(nn.Module):
    """Global pooling plus Linear -> LeakyReLU on every decoder stage; returns (B, n_stages, features)."""

    def __init__(self, decoder_channels: Sequence[int], stage_features: int, pool: str = "max"):
        super().__init__()
        self.pool = _check_pool(pool)
        self.project = nn.ModuleList([nn.Linear(c, stage_features) for c in decoder_channels])
        self.act = nn.LeakyReLU(1e-2)

    def forward(self, decoder_features: Sequence[Tensor]) -> Tensor:
        return torch.stack([self.act(project(global_pool(f, self.pool)))
                            for project, f in zip(self.project, decoder_features)], dim=1)


class MultiStageHead(ClassificationHead):
    """PANDA's multi-stage head: global max pool + linear on every decoder stage, concatenated, then
    a classifier MLP (REFERENCE section 3; trained with 0.3 x cross-entropy next to the segmentation loss).

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        stage_features: width of each stage's linear projection.
        hidden: hidden units of the classifier MLP, 0 for a single linear layer.
        dropout: dropout before each linear layer of the classifier.
        pool: "max" (PANDA), "avg" or "avgmax".
    """

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, stage_features: int = 64,
                 hidden: int = 128, dropout: float = 0.2, pool: str = "max"):
        super().__init__(decoder_channels, num_subtypes)
        self.stages = StagePooling(self.decoder_channels, stage_features, pool)
        self.classifier = classifier_mlp(stage_features * len(self.decoder_channels), num_subtypes, hidden,
                                         dropout)

    def forward(self, unet: UNetOutput) -> Tensor:
        """unet: the backbone's output -> class logits (B, num_subtypes)."""
        return self.classifier(self.stages(unet.decoder_features).flatten(1))


class OneVsRestHead(ClassificationHead):
    """One binary classifier per subtype ("is it subtype k?") on the multi-stage pooled features.

    Returns (B, K) independent logits meant for ``BCEWithLogitsLoss`` against one-hot targets. For
    class probabilities use ``probabilities``: the sigmoids normalised to sum to 1 (the predicted
    subtype is the argmax of the logits either way).

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        stage_features: width of each stage's linear projection (shared by the binary heads).
        hidden: hidden units of each binary head, 0 for a single linear layer.
        dropout: dropout before each linear layer.
        pool: "max", "avg" or "avgmax".
    """

    loss_kind = "bce"

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, stage_features: int = 64,
                 hidden: int = 64, dropout: float = 0.2, pool: str = "max"):
        super().__init__(decoder_channels, num_subtypes)
        self.stages = StagePooling(self.decoder_channels, stage_features, pool)
        in_features = stage_features * len(self.decoder_channels)
        self.binary_heads = nn.ModuleList([classifier_mlp(in_features, 1, hidden, dropout)
                                           for _ in range(num_subtypes)])

    def forward(self, unet: UNetOutput) -> Tensor:
        """unet: the backbone's output -> one binary logit per subtype (B, num_subtypes)."""
        pooled = self.stages(unet.decoder_features).flatten(1)
        return torch.cat([head(pooled) for head in self.binary_heads], dim=1)

    def probabilities(self, logits: Tensor) -> Tensor:
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class LesionAttentionHead(ClassificationHead):
    """Pooling where the network itself sees the lesion, then attention over the decoder stages (ours).

    Per decoder stage i: the lesion probability p (softmax of the full-resolution segmentation
    logits, lesion channel) is area-downsampled to the stage's resolution; voxel weights are
    ``softmax(log p / T_i)`` with a learned temperature T_i (small T: the most lesion-like voxels,
    T = 1: weighted by p, large T: uniform), blended with uniform weights by the stage's largest p, so
    a patch where no lesion is predicted falls back to global average pooling. The pooled vector goes
    through Linear -> LeakyReLU; a learned score per stage, softmaxed over stages, weighs the stages;
    an MLP classifies the result.

    The full-resolution logits are used at every stage so that the head computes the same thing with
    and without deep supervision (training versus inference).

    Truth guidance (training only): with the batch's lesion mask passed as ``lesion_mask``, a share
    ``truth_guidance`` of the samples are pooled over the true lesion (p = the mask) instead of the
    predicted one. Early in training the segmentation finds no lesion, so a purely self-guided head
    pools the whole patch and its features carry no lesion texture; pooling over the true lesion
    teaches the classifier and shapes the lesion's features from the first step. At inference the
    predicted probability guides, sharpened by the temperature (weights ~ p^(1/T)).

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        lesion_channel: channel of the segmentation logits that is the lesion (label 2).
        stage_features: width of each stage's projection and of the stage attention.
        hidden: hidden units of the classifier MLP, 0 for a single linear layer.
        dropout: dropout before each linear layer of the classifier.
        init_temperature: starting T of every stage.
        learn_temperature: learn T (else keep it fixed).
        detach_attention: stop the classification loss from changing the segmentation through the
            attention weights (the lesion is where the segmentation task says it is).
        truth_guidance: share of training samples pooled over the true lesion mask when one is
            given (0: always the network's own lesion probability).
        truth_jitter: the true mask of a truth-guided sample is, with equal chance, eroded, kept or
            dilated by this many voxels, so the head does not learn the exact boundary that a
            predicted lesion never has (0: the mask as it is).
        pool: "mean" (the attention-weighted mean of each channel), "meanmax" (that mean and the
            largest response among the attended voxels, each voxel scaled by its weight relative to
            the largest: thin bright structures such as septa show in the maximum, not the mean), or
            "regions" (separate means over the lesion's core, its rim and the ring of tissue around
            it, see ``lesion_regions``: an enhancing wall or a contrast to the neighbouring
            parenchyma is lost when the whole lesion is averaged).
        image_statistics: also describe the input image under the same guide, radiomics-style
            (``lesion_image_statistics``: mean, spread, core-to-rim and lesion-to-surroundings
            contrast, edge strength), projected and joined to the stage mixture before the classifier.
        input_channels: channels of the input image (from the plan).
    """

    uses_lesion_mask = True

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, lesion_channel: int = LESION_LABEL,
                 stage_features: int = 64, hidden: int = 128, dropout: float = 0.2,
                 init_temperature: float = 1.0, learn_temperature: bool = True, detach_attention: bool = True,
                 truth_guidance: float = 0.0, pool: str = "mean", image_statistics: bool = False,
                 input_channels: int = 1, truth_jitter: int = 0):
        super().__init__(decoder_channels, num_subtypes)
        self.uses_image = bool(image_statistics)
        if pool not in LESION_POOLINGS:
            raise ValueError(f"unknown lesion pooling {pool!r}, expected one of {LESION_POOLINGS}")
        self.pool = pool
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        if not 0.0 <= truth_guidance <= 1.0:
            raise ValueError(f"truth_guidance is a share of samples in [0, 1], got {truth_guidance}")
        self.lesion_channel = int(lesion_channel)
        self.detach_attention = bool(detach_attention)
        self.truth_guidance = float(truth_guidance)
        if truth_jitter < 0:
            raise ValueError(f"truth_jitter is a number of voxels >= 0, got {truth_jitter}")
        self.truth_jitter = int(truth_jitter)
        log_t = torch.full((len(self.decoder_channels),), math.log(init_temperature))
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_temperature)
        widen = {"mean": 1, "meanmax": 2, "regions": 3}[pool]
        self.project = nn.ModuleList([nn.Linear(widen * c, stage_features) for c in self.decoder_channels])
        self.act = nn.LeakyReLU(1e-2)
        self.stage_score = nn.Linear(stage_features, 1)
        self.image_project = (nn.Linear(IMAGE_STATISTICS * int(input_channels), stage_features)
                              if self.uses_image else None)
        widths = stage_features * (2 if self.uses_image else 1)
        self.classifier = classifier_mlp(widths, num_subtypes, hidden, dropout)

    def lesion_probability(self, seg_logits: Tensor) -> Tensor:
        """seg_logits (B, K, Z, Y, X) -> lesion probability (B, 1, Z, Y, X), float32."""
        if seg_logits.shape[1] <= self.lesion_channel:
            raise ValueError(f"segmentation logits have {seg_logits.shape[1]} channels, the lesion is channel "
                             f"{self.lesion_channel}")
        probability = seg_logits.float().softmax(dim=1)[:, self.lesion_channel:self.lesion_channel + 1]
        return probability.detach() if self.detach_attention else probability

    def attention_weights(self, lesion_probability: Tensor, stage: int) -> Tensor:
        """lesion_probability (B, 1, z, y, x) at the stage's resolution -> voxel weights (B, z*y*x) summing to 1."""
        p = lesion_probability.flatten(1)
        focused = (p.clamp_min(1e-6).log() / self.log_temperature[stage].exp()).softmax(dim=1)
        gate = p.amax(dim=1, keepdim=True)  # ~0 where no lesion is predicted: uniform pooling
        return gate * focused + (1.0 - gate) / p.shape[1]

    def guide(self, seg_logits: Tensor, lesion_mask: Tensor | None) -> Tensor:
        """The map the pooling follows (B, 1, Z, Y, X): the predicted lesion probability, or for a
        ``truth_guidance`` share of the samples in training the true ``lesion_mask`` (B, 1, Z, Y, X)."""
        probability = self.lesion_probability(seg_logits)
        if lesion_mask is None or not self.training or self.truth_guidance <= 0:
            return probability
        if lesion_mask.shape[2:] != probability.shape[2:]:
            raise ValueError(f"lesion_mask has spatial shape {tuple(lesion_mask.shape[2:])}, the segmentation "
                             f"logits {tuple(probability.shape[2:])}")
        chosen = torch.rand(probability.shape[0], device=probability.device) < self.truth_guidance
        truth = jitter_mask(lesion_mask.to(probability.dtype), self.truth_jitter)
        return torch.where(chosen.view(-1, 1, 1, 1, 1), truth, probability)

    def pool_stage(self, features: Tensor, guide: Tensor, stage: int) -> Tensor:
        """features (B, C, z, y, x) and the guide map(s) (B, R, Z, Y, X) at full resolution -> the
        pooled vector (B, widen * C) of this stage."""
        maps = F.interpolate(guide, size=features.shape[2:], mode="area")
        flat = features.flatten(2)
        pooled = []
        for region in range(maps.shape[1]):
            weights = self.attention_weights(maps[:, region:region + 1], stage).to(features.dtype)  # (B, N)
            pooled.append(torch.einsum("bn,bcn->bc", weights, flat))
            if self.pool == "meanmax":
                relative = weights / weights.amax(dim=1, keepdim=True).clamp_min(1e-12)   # 1 at the focus
                pooled.append((flat * relative[:, None]).amax(dim=2))
        return torch.cat(pooled, dim=1)

    def forward(self, unet: UNetOutput, lesion_mask: Tensor | None = None, image: Tensor | None = None) -> Tensor:
        """unet: the backbone's output; lesion_mask: the true lesion (B, 1, Z, Y, X), used only in
        training (see ``truth_guidance``); image: the network's input (B, C, Z, Y, X), required with
        ``image_statistics`` -> class logits (B, num_subtypes)."""
        lesion = self.guide(unet.seg_logits[0], lesion_mask)
        guide = lesion_regions(lesion) if self.pool == "regions" else lesion
        tokens = [self.act(project(self.pool_stage(features, guide, stage)))
                  for stage, (features, project) in enumerate(zip(unet.decoder_features, self.project))]
        tokens = torch.stack(tokens, dim=1)                                    # (B, S, F)
        stage_weights = self.stage_score(tokens).softmax(dim=1)                # (B, S, 1)
        mixed = (stage_weights * tokens).sum(dim=1)
        if self.uses_image:
            if image is None:
                raise ValueError("this head describes the input image (image_statistics: true); pass image=")
            statistics = lesion_image_statistics(image, lesion).to(mixed.dtype)
            mixed = torch.cat([mixed, self.act(self.image_project(statistics))], dim=1)
        return self.classifier(mixed)
