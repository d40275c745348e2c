"""Lesion subtype classification heads on the backbone's decoder features.

Every head is built as ``Head(decoder_channels, num_subtypes, **knobs)`` and called as
``head(unet_output) -> class logits (B, num_subtypes)``, where ``unet_output`` is the backbone's
:class:`~pancreas_mtl.models.resenc_unet.UNetOutput` (decoder features lowest resolution first,
segmentation logits highest resolution first). ``decoder_channels`` are the channels of
``unet_output.decoder_features`` in that order. A head declares the loss its logits are meant for
(``loss_kind``: "ce" for softmax cross-entropy, "bce" for one-vs-rest binary cross-entropy) and turns
logits into class probabilities with ``probabilities``. Segmentation only is no head at all (None).

Where the PANDA-family heads (single stage, multi-stage, one-vs-rest) pool is their ``region``:
``patch`` pools the whole patch (PANDA's global pooling), ``lesion`` pools where the network predicts
the lesion, ``pancreas`` where it predicts pancreas or lesion (:class:`RegionGuide`; in training a share
of the samples follow the true mask instead). A lesion is a few percent of a patch's voxels, and a
global maximum over features trained for segmentation mostly reports the organ's boundaries, not the
lesion's texture: pooled over the patch, these heads stay at chance on the synthetic set.

Adding a head: one class here with that constructor and call, plus ``conf/model/head/<name>.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pancreas_mtl.models.pooling import (
    IMAGE_STATISTICS,
    POOLINGS,
    RegionGuide,
    global_pool,
    lesion_image_statistics,
    lesion_regions,
    region_pool,
)
from pancreas_mtl.models.resenc_unet import UNetOutput
from pancreas_mtl.planning.plan import LESION_LABEL

LESION_POOLINGS = ("mean", "meanmax", "regions")
STATISTICS_FEATURES = 64  # width of the image statistics' projection in the PANDA-family heads


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


class GuidedHead(ClassificationHead):
    """Base of the PANDA-family heads: pools over a :class:`RegionGuide`'s region, and optionally describes
    the input image under it (``lesion_image_statistics``, projected to ``statistics_features``) next to
    the pooled decoder features.

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        region, lesion_channel, truth_guidance, truth_jitter: see :class:`RegionGuide`.
        image_statistics: also describe the input image under the region (not with region "patch").
        statistics_features: width of the image statistics' projection.
        input_channels: channels of the input image (from the plan).
    """

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, *, region: str, truth_guidance: float,
                 truth_jitter: int, image_statistics: bool, statistics_features: int,
                 lesion_channel: int = LESION_LABEL, input_channels: int = 1):
        super().__init__(decoder_channels, num_subtypes)
        self.region_guide = RegionGuide(region, lesion_channel, truth_guidance, truth_jitter)
        if image_statistics and region == "patch":
            raise ValueError("image_statistics describe the image under a region: set region to lesion or pancreas")
        self.uses_lesion_mask = self.region_guide.uses_lesion_mask
        self.uses_image = bool(image_statistics)
        self.image_project = (nn.Linear(IMAGE_STATISTICS * int(input_channels), statistics_features)
                              if self.uses_image else None)
        self.statistics_features = statistics_features if self.uses_image else 0

    def pool(self, features: Tensor, guide: Tensor | None, pool: str) -> Tensor:
        """features (B, C, z, y, x) -> (B, C) over the guide's region (the whole patch without one)."""
        return global_pool(features, pool) if guide is None else region_pool(features, guide, pool)

    def stage_features(self, stages: StagePooling, unet: UNetOutput, lesion_mask: Tensor | None,
                       image: Tensor | None) -> Tensor:
        """Every decoder stage pooled over the region by ``stages`` and projected, concatenated (B, S * F),
        joined by the image statistics when configured."""
        guide = self.region_guide(unet.seg_logits[0], lesion_mask)
        return self.with_statistics(stages(unet.decoder_features, guide).flatten(1), guide, image)

    def with_statistics(self, pooled: Tensor, guide: Tensor | None, image: Tensor | None) -> Tensor:
        """``pooled`` (B, F) joined by the projected image statistics under ``guide`` when configured."""
        if not self.uses_image:
            return pooled
        if image is None:
            raise ValueError("this head describes the input image (image_statistics: true); pass image=")
        statistics = lesion_image_statistics(image, guide).to(pooled.dtype)
        return torch.cat([pooled, F.leaky_relu(self.image_project(statistics), 1e-2)], dim=1)


class SingleStageHead(GuidedHead):
    """Global pooling on one decoder stage (default the last, full resolution) and a classifier.

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        stage: index into the decoder stages, lowest resolution first (-1: full resolution).
        pool: "max" (PANDA), "avg" or "avgmax".
        hidden: hidden units of the classifier, 0 for a single linear layer.
        dropout: dropout before each linear layer of the classifier.
        region, lesion_channel, truth_guidance, truth_jitter, image_statistics, input_channels: where
            to pool and what else to read (:class:`GuidedHead`).

    The knobs are conf/model/head/single_stage.yaml's keys, with no default here (the YAML is their one
    home); ``lesion_channel`` and ``input_channels`` come from the plan (``build_model``).
    """

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, *, stage: int, pool: str, hidden: int,
                 dropout: float, region: str, truth_guidance: float, truth_jitter: int, image_statistics: bool,
                 lesion_channel: int = LESION_LABEL, input_channels: int = 1):
        super().__init__(decoder_channels, num_subtypes, region=region, lesion_channel=lesion_channel,
                         truth_guidance=truth_guidance, truth_jitter=truth_jitter,
                         image_statistics=image_statistics, statistics_features=STATISTICS_FEATURES,
                         input_channels=input_channels)
        self.stage = range(len(self.decoder_channels))[stage]  # IndexError names a bad index
        self.pool_kind = _check_pool(pool)
        self.classifier = classifier_mlp(self.decoder_channels[self.stage] + self.statistics_features,
                                         num_subtypes, hidden, dropout)

    def forward(self, unet: UNetOutput, lesion_mask: Tensor | None = None, image: Tensor | None = None) -> Tensor:
        """unet: the backbone's output [, the true lesion in training, the input image] -> class logits (B, K)."""
        guide = self.region_guide(unet.seg_logits[0], lesion_mask)
        pooled = self.pool(unet.decoder_features[self.stage], guide, self.pool_kind)
        return self.classifier(self.with_statistics(pooled, guide, image))


class StagePooling(nn.Module):
    """Pooling (global, or over a guide's region) plus Linear -> LeakyReLU on every decoder stage; returns
    (B, n_stages, features)."""

    def __init__(self, decoder_channels: Sequence[int], stage_features: int, pool: str):
        super().__init__()
        self.pool = _check_pool(pool)
        self.project = nn.ModuleList([nn.Linear(c, stage_features) for c in decoder_channels])
        self.act = nn.LeakyReLU(1e-2)

    def forward(self, decoder_features: Sequence[Tensor], guide: Tensor | None = None) -> Tensor:
        pooled = [global_pool(f, self.pool) if guide is None else region_pool(f, guide, self.pool)
                  for f in decoder_features]
        return torch.stack([self.act(project(p)) for project, p in zip(self.project, pooled)], dim=1)


class MultiStageHead(GuidedHead):
    """PANDA's multi-stage head: global max pool + linear on every decoder stage, concatenated, then
    a classifier MLP (REFERENCE section 3; trained with 0.3 x cross-entropy next to the segmentation loss).

    Args:
        decoder_channels, num_subtypes: see ``ClassificationHead``.
        stage_features: width of each stage's linear projection.
        hidden: hidden units of the classifier MLP, 0 for a single linear layer.
        dropout: dropout before each linear layer of the classifier.
        pool: "max" (PANDA), "avg" or "avgmax".
        region, lesion_channel, truth_guidance, truth_jitter, image_statistics, input_channels: where
            to pool and what else to read (:class:`GuidedHead`).

    The knobs are conf/model/head/multistage.yaml's keys (ovr.yaml's for :class:`OneVsRestHead`;
    multistage_paper.yaml is PANDA's whole patch), with no default here; ``lesion_channel`` and
    ``input_channels`` come from the plan (``build_model``).
    """

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, *, stage_features: int, hidden: int,
                 dropout: float, pool: str, region: str, truth_guidance: float, truth_jitter: int,
                 image_statistics: bool, lesion_channel: int = LESION_LABEL, input_channels: int = 1):
        super().__init__(decoder_channels, num_subtypes, region=region, lesion_channel=lesion_channel,
                         truth_guidance=truth_guidance, truth_jitter=truth_jitter,
                         image_statistics=image_statistics, statistics_features=STATISTICS_FEATURES,
                         input_channels=input_channels)
        self.stages = StagePooling(self.decoder_channels, stage_features, pool)
        self.classifier = self.build_classifier(
            stage_features * len(self.decoder_channels) + self.statistics_features, num_subtypes, hidden, dropout)

    def build_classifier(self, in_features: int, num_subtypes: int, hidden: int, dropout: float) -> nn.Module:
        """The classifier on the pooled features (B, in_features) -> logits (B, num_subtypes)."""
        return classifier_mlp(in_features, num_subtypes, hidden, dropout)

    def forward(self, unet: UNetOutput, lesion_mask: Tensor | None = None, image: Tensor | None = None) -> Tensor:
        """unet: the backbone's output [, the true lesion in training, the input image] -> class logits (B, K)."""
        return self.classifier(self.stage_features(self.stages, unet, lesion_mask, image))


class BinaryClassifiers(nn.Module):
    """One binary classifier per subtype ("is it subtype k?") on the same features: (B, F) -> (B, K)."""

    def __init__(self, in_features: int, num_subtypes: int, hidden: int, dropout: float):
        super().__init__()
        self.binary_heads = nn.ModuleList([classifier_mlp(in_features, 1, hidden, dropout)
                                           for _ in range(num_subtypes)])

    def forward(self, features: Tensor) -> Tensor:
        return torch.cat([head(features) for head in self.binary_heads], dim=1)


class OneVsRestHead(MultiStageHead):
    """The multi-stage head with one binary classifier per subtype in place of one softmax classifier.

    Returns (B, K) independent logits meant for ``BCEWithLogitsLoss`` against one-hot targets. For
    class probabilities use ``probabilities``: the sigmoids normalised to sum to 1 (the predicted
    subtype is the argmax of the logits either way). Arguments are :class:`MultiStageHead`'s; ``hidden``
    is per binary classifier.
    """

    loss_kind = "bce"

    def build_classifier(self, in_features: int, num_subtypes: int, hidden: int, dropout: float) -> nn.Module:
        return BinaryClassifiers(in_features, num_subtypes, hidden, dropout)

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

    The knobs are conf/model/head/lesion_attention.yaml's keys, with no default here (the YAML is their
    one home); ``lesion_channel`` and ``input_channels`` come from the plan (``build_model``).
    """

    uses_lesion_mask = True

    def __init__(self, decoder_channels: Sequence[int], num_subtypes: int, *, stage_features: int, hidden: int,
                 dropout: float, init_temperature: float, learn_temperature: bool, detach_attention: bool,
                 truth_guidance: float, truth_jitter: int, pool: str, image_statistics: bool,
                 lesion_channel: int = LESION_LABEL, input_channels: int = 1):
        super().__init__(decoder_channels, num_subtypes)
        self.uses_image = bool(image_statistics)
        if pool not in LESION_POOLINGS:
            raise ValueError(f"unknown lesion pooling {pool!r}, expected one of {LESION_POOLINGS}")
        self.pool = pool
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        self.region_guide = RegionGuide("lesion", lesion_channel, truth_guidance, truth_jitter, detach_attention)
        self.lesion_channel = int(lesion_channel)
        self.detach_attention = bool(detach_attention)
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

    @property
    def truth_guidance(self) -> float:
        return self.region_guide.truth_guidance

    @truth_guidance.setter
    def truth_guidance(self, share: float) -> None:
        self.region_guide.truth_guidance = float(share)

    @property
    def truth_jitter(self) -> int:
        return self.region_guide.truth_jitter

    @truth_jitter.setter
    def truth_jitter(self, voxels: int) -> None:
        self.region_guide.truth_jitter = int(voxels)

    def lesion_probability(self, seg_logits: Tensor) -> Tensor:
        """seg_logits (B, K, Z, Y, X) -> lesion probability (B, 1, Z, Y, X), float32."""
        return self.region_guide.predicted(seg_logits)

    def attention_weights(self, lesion_probability: Tensor, stage: int) -> Tensor:
        """lesion_probability (B, 1, z, y, x) at the stage's resolution -> voxel weights (B, z*y*x) summing to 1."""
        p = lesion_probability.flatten(1)
        focused = (p.clamp_min(1e-6).log() / self.log_temperature[stage].exp()).softmax(dim=1)
        gate = p.amax(dim=1, keepdim=True)  # ~0 where no lesion is predicted: uniform pooling
        return gate * focused + (1.0 - gate) / p.shape[1]

    def guide(self, seg_logits: Tensor, lesion_mask: Tensor | None) -> Tensor:
        """The map the pooling follows (B, 1, Z, Y, X): the predicted lesion probability, or for a
        ``truth_guidance`` share of the samples in training the true ``lesion_mask`` (B, 1, Z, Y, X)."""
        return self.region_guide(seg_logits, lesion_mask)

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
