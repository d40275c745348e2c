"""Whole-case prediction by Gaussian-weighted sliding windows, with mirroring and subtype evidence per window.

nnU-Net's scheme, in torch and on the image's device: the case is tiled by windows (the plan's patch)
at a step of ``1 - overlap`` of the window (at least one voxel; at most ``max_windows_per_case`` windows
per pass), several windows go through the network per batch, each window's logits are weighted by a
Gaussian importance map (sigma 1/8 of the window) and summed into a whole-case buffer, and the sum is
divided by the summed weights. Mirroring (test-time augmentation) runs every window once per
combination of flipped axes and averages the flipped-back outputs, as nnU-Net does per window.

Out of GPU memory, a pass does not fail at once: the windows go through the network in halved
batches, down to one window, and then the whole-case sums move to the CPU (the network stays on the
device), each step logged as a warning (nnU-Net moves its result arrays to the CPU the same way).

The subtype head runs on the same windows. Per window, its class probabilities are averaged over the
mirror passes; the case's probabilities are the windows' averaged with weights proportional to each
window's predicted lesion volume (:func:`aggregate_window_predictions`).

Where the windows go (starts, counts, the cap, mirror passes, the Gaussian map) is planned in
:mod:`pancreas_mtl.inference.windows`; this module runs the network over them and stitches the result.

Tensors: images (1, C, Z, Y, X); windows (N, C, *roi); every spatial triple is (z, y, x).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pancreas_mtl.inference.settings import InferenceSettings
from pancreas_mtl.inference.windows import (
    check_window_count,
    gaussian_importance_map,
    mirror_combinations,
    window_starts,
)
from pancreas_mtl.models.multitask import MultiTaskNet
from pancreas_mtl.planning.plan import LESION_LABEL

log = logging.getLogger(__name__)

# torch.OutOfMemoryError since torch 2.5; torch.cuda.OutOfMemoryError is the same class
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def aggregate_window_predictions(window_probabilities: Tensor, lesion_volumes: Tensor,
                                 min_lesion_volume: float = 0.5) -> Tensor:
    """One case's subtype probabilities from those of its sliding windows.

    The subtype is a property of the lesion, and a window that holds more of the predicted lesion has
    seen more of the evidence; so the case's probabilities are the windows' probabilities averaged with
    weights proportional to each window's predicted lesion volume. When the windows together predict
    less than ``min_lesion_volume`` voxels of lesion (none, in practice), every window weighs the same.

    Args:
        window_probabilities: (N, K) class probabilities of N windows (rows sum to 1).
        lesion_volumes: (N,) predicted lesion volume of each window, >= 0 (see :func:`lesion_volumes`).
        min_lesion_volume: total volume below which the weights fall back to uniform.

    Returns (K,) probabilities summing to 1, float32.
    """
    if window_probabilities.ndim != 2 or lesion_volumes.shape != window_probabilities.shape[:1]:
        raise ValueError(f"expected (N, K) probabilities and (N,) volumes, got {tuple(window_probabilities.shape)} "
                         f"and {tuple(lesion_volumes.shape)}")
    if window_probabilities.shape[0] == 0:
        raise ValueError("no windows to aggregate")
    weights = lesion_volumes.double().clamp_min(0.0)
    if weights.sum() < min_lesion_volume:
        weights = torch.ones_like(weights)
    pooled = (weights[:, None] * window_probabilities.double()).sum(0) / weights.sum()
    return pooled.float()


def lesion_volumes(seg_logits: Tensor, lesion_channel: int = LESION_LABEL) -> Tensor:
    """seg_logits (N, K, *roi) -> (N,) predicted lesion volume of each window, in voxels.

    The sum of the softmax lesion probability over the voxels whose argmax is the lesion. (Summing it
    over every voxel would let the small lesion probability of 10^5 background voxels outweigh a real
    lesion.)
    """
    probability = seg_logits.float().softmax(dim=1)
    lesion = probability[:, lesion_channel] * (probability.argmax(dim=1) == lesion_channel)
    return lesion.flatten(1).sum(1)


def window_forward(model: nn.Module, windows: Tensor) -> tuple[Tensor, Tensor | None]:
    """One forward pass over a batch of windows (N, C, *roi) -> (segmentation logits (N, K_seg, *roi),
    class probabilities (N, K) or None).

    A :class:`MultiTaskNet` runs its backbone once without deep supervision and its head on the same
    features. Any other module must return that pair itself (test stubs, exported networks).
    """
    if isinstance(model, MultiTaskNet):
        unet = model.backbone(windows, deep_supervision=False)
        probabilities = None if model.head is None else model.class_probabilities(model.classify(unet, windows))
        return unet.seg_logits[0], probabilities
    return model(windows)


def mirrored_forward(model: nn.Module, windows: Tensor, flips: Sequence[tuple[int, ...]]
                     ) -> tuple[Tensor, Tensor | None]:
    """:func:`window_forward` averaged over mirror passes: each flip of the input, its output flipped
    back. Returns float32 segmentation logits (N, K_seg, *roi) and class probabilities (N, K) or None."""
    logits_sum, probability_sum = None, None
    for dims in flips:
        seg_logits, probabilities = window_forward(model, windows.flip(dims) if dims else windows)
        seg_logits = seg_logits.float()
        seg_logits = seg_logits.flip(dims) if dims else seg_logits
        logits_sum = seg_logits if logits_sum is None else logits_sum + seg_logits
        if probabilities is not None:
            probabilities = probabilities.float()
            probability_sum = probabilities if probability_sum is None else probability_sum + probabilities
    return logits_sum / len(flips), (None if probability_sum is None else probability_sum / len(flips))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward passes (``dtype`` bfloat16/float16), or nothing for None/float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class WindowPrediction:
    """What a sliding-window pass over one case gives.

    Attributes:
        logits: (1, K_seg, Z, Y, X) float32 stitched segmentation logits, on the image's device (on the
            CPU after the out-of-memory fallback moved the sums there).
        window_probabilities: (N, K) per-window class probabilities (mirror-averaged), or None without a head.
        lesion_volumes: (N,) predicted lesion volume of each window (voxels).
        num_windows: windows per mirror pass.
        sw_batch_size: windows per forward pass at the end (smaller than asked after out-of-memory errors).
        accumulated_on_cpu: the whole-case sums were kept on the CPU (asked for, or after running out of
            memory on the device).
    """

    logits: Tensor
    window_probabilities: Tensor | None
    lesion_volumes: Tensor
    num_windows: int
    sw_batch_size: int = 1
    accumulated_on_cpu: bool = False

    def class_probabilities(self, min_lesion_volume: float = 0.5) -> Tensor | None:
        """(K,) case probabilities by :func:`aggregate_window_predictions`, or None without a head."""
        if self.window_probabilities is None:
            return None
        return aggregate_window_predictions(self.window_probabilities, self.lesion_volumes, min_lesion_volume)


def release_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so a retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Stitcher:
    """Gaussian-weighted sums of window logits over the (padded) case: logits (K, Z, Y, X) and weights
    (Z, Y, X), float32, on ``device``, or on the CPU once :meth:`to_cpu` moved them there (``on_cpu``)."""

    def __init__(self, num_channels: int, shape: Sequence[int], weights: Tensor, device: torch.device,
                 on_cpu: bool = False):
        self.on_cpu = on_cpu
        self.device = torch.device("cpu") if on_cpu else device
        self.weights = weights.to(self.device)
        self.logits_sum = torch.zeros((num_channels, *shape), dtype=torch.float32, device=self.device)
        self.weight_sum = torch.zeros(tuple(shape), dtype=torch.float32, device=self.device)

    def to_cpu(self) -> None:
        self.on_cpu, self.device = True, torch.device("cpu")
        self.weights, self.logits_sum, self.weight_sum = (t.cpu() for t in (self.weights, self.logits_sum,
                                                                            self.weight_sum))

    def add(self, seg_logits: Tensor, region: tuple[slice, ...]) -> None:
        """Add one window's logits (K, *roi). Out of memory, the sums move to the CPU first; nothing is
        added twice, since the only allocation (the weighted window) comes before the in-place adds."""
        out_of_memory = False
        try:
            weighted = seg_logits.to(self.device) * self.weights
        except OutOfMemoryError:
            if self.on_cpu:
                raise
            out_of_memory = True
        if out_of_memory:
            release_memory(self.device)
            log.warning("out of memory adding a window to the whole-case sums on %s; continuing with "
                        "the sums on the CPU", self.device)
            self.to_cpu()
            weighted = seg_logits.to(self.device) * self.weights
        self.logits_sum[(slice(None), *region)] += weighted
        self.weight_sum[region] += self.weights

    def result(self) -> Tensor:
        return self.logits_sum / self.weight_sum


def _new_stitcher(num_channels: int, shape: Sequence[int], weights: Tensor, device: torch.device,
                  on_cpu: bool) -> _Stitcher:
    """The sums on ``device`` (on the CPU with ``on_cpu``), or on the CPU when they do not fit there."""
    try:
        return _Stitcher(num_channels, shape, weights, device, on_cpu)
    except OutOfMemoryError:
        if on_cpu:
            raise
    # out of memory on the device; handled here, once the exception and the frames it holds are gone
    release_memory(device)
    log.warning("out of memory allocating the whole-case sums %s on %s; keeping them on the CPU",
                (num_channels, *shape), device)
    return _Stitcher(num_channels, shape, weights, device, on_cpu=True)


@torch.no_grad()
def predict_windows(model: nn.Module, image: Tensor, roi_size: Sequence[int], settings: InferenceSettings, *,
                    sw_batch_size: int | None = None, lesion_channel: int = LESION_LABEL,
                    memory_format: torch.memory_format | None = None, autocast_dtype: torch.dtype | None = None,
                    accumulate_on_cpu: bool = False, case_id: str | None = None,
                    on_windows: Callable[[int], None] | None = None) -> WindowPrediction:
    """Gaussian-weighted sliding-window prediction of one case; every buffer stays on the image's device
    unless it runs out of memory.

    Out of memory in a forward pass, the pass is retried with half the windows per batch (down to one);
    out of memory with one window, or while adding to the sums, the whole-case sums move to the CPU and
    the pass goes on; only when one window does not fit next to nothing else is the error raised. Each
    fallback is logged as a warning and reported in the result (``sw_batch_size``,
    ``accumulated_on_cpu``) so that a caller can start the next case where this one ended.

    Args:
        model: the network in eval mode, on the image's device (see :func:`window_forward`).
        image: (1, C, Z, Y, X) preprocessed case. Along an axis shorter than the window the case is padded
            with 0 on both sides (nnU-Net) and the padding cropped off the result.
        roi_size: (z, y, x) window, each divisible by the network's stride product per axis (the caller
            resolves ``settings.roi_size`` or the plan's patch, see ``Predictor.window_for``).
        settings: the windows' settings; this reads ``overlap`` (the step is ``1 - overlap`` of the
            window; nnU-Net's tile_step_size 0.5 is overlap 0.5), ``sigma_scale`` (Gaussian sigma as a share
            of the window), ``mirror_axes`` (spatial axes 0=z, 1=y, 2=x whose every flip combination is
            averaged; nnU-Net all three, 8 passes), ``sw_batch_size``, ``nnunet_compat`` (nnU-Net's own
            Gaussian map, :func:`gaussian_importance_map`) and ``max_windows_per_case`` (more windows are a
            :class:`~pancreas_mtl.inference.windows.TooManyWindowsError` before the first forward pass).
        sw_batch_size: windows per forward pass instead of ``settings.sw_batch_size`` (a caller's
            out-of-memory fallback carried over from an earlier case).
        lesion_channel: segmentation channel of the lesion, for the per-window lesion volume.
        memory_format: e.g. ``torch.channels_last_3d`` for the windows (recent GPUs).
        autocast_dtype: torch.bfloat16 / torch.float16 for mixed precision; None (float32) otherwise.
            Accumulation is float32 either way.
        accumulate_on_cpu: keep the whole-case sums on the CPU from the start (the network still runs on
            the image's device).
        case_id: the case, named in errors.
        on_windows: called after each forward batch with the window forward passes it ran (windows x
            mirror passes), for a progress bar.
    """
    overlap, mirror_axes = settings.overlap, settings.mirror_axes
    sw_batch_size = settings.sw_batch_size if sw_batch_size is None else sw_batch_size
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"expected one case (1, C, Z, Y, X), got {tuple(image.shape)}")
    roi_size = tuple(int(s) for s in roi_size)
    if len(roi_size) != 3 or min(roi_size) < 1:
        raise ValueError(f"roi_size must be a positive (z, y, x) triple, got {roi_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be at least 1, got {sw_batch_size}")
    shape = tuple(image.shape[2:])
    pad = [max(window - size, 0) for size, window in zip(shape, roi_size)]
    before = [p // 2 for p in pad]
    if any(pad):
        # F.pad lists the last axis first: (x_before, x_after, y_before, y_after, z_before, z_after)
        widths = [w for axis in (2, 1, 0) for w in (before[axis], pad[axis] - before[axis])]
        image = F.pad(image, widths, mode="constant", value=0.0)
    padded = tuple(image.shape[2:])
    starts = [window_starts(size, window, 1.0 - overlap) for size, window in zip(padded, roi_size)]
    check_window_count(math.prod(len(axis) for axis in starts), shape, roi_size, settings, case_id)
    positions = list(itertools.product(*starts))
    flips = mirror_combinations(mirror_axes)
    weights = gaussian_importance_map(roi_size, settings.sigma_scale, image.device, settings.nnunet_compat)

    stitcher: _Stitcher | None = None
    window_probabilities, volumes = [], []
    batch_size, done = sw_batch_size, 0
    while done < len(positions):
        batch = positions[done:done + batch_size]
        regions = [tuple(slice(start, start + window) for start, window in zip(corner, roi_size)) for corner in batch]
        out_of_memory = False
        try:
            windows = torch.cat([image[(slice(None), slice(None), *region)] for region in regions])
            if memory_format is not None:
                windows = windows.contiguous(memory_format=memory_format)
            with autocast_context(image.device, autocast_dtype):
                seg_logits, probabilities = mirrored_forward(model, windows, flips)
        except OutOfMemoryError:
            out_of_memory = True  # handled below, once the exception and the frames it holds are gone
        if out_of_memory:
            windows = seg_logits = probabilities = None
            release_memory(image.device)
            if batch_size > 1:
                batch_size = max(1, batch_size // 2)
                log.warning("out of memory on %s with %d windows per forward pass; retrying with %d",
                            image.device, len(batch), batch_size)
            elif not (accumulate_on_cpu or (stitcher is not None and stitcher.on_cpu)):
                accumulate_on_cpu = True
                if stitcher is not None:
                    stitcher.to_cpu()
                log.warning("out of memory on %s with one window per forward pass; moving the whole-case sums "
                            "to the CPU and retrying", image.device)
            else:
                raise OutOfMemoryError(
                    f"out of memory on {image.device} with one {roi_size} window per forward pass and the "
                    "whole-case sums on the CPU; use a smaller inference.roi_size, precision=bf16, or "
                    "device=cpu")
            continue
        if stitcher is None:
            stitcher = _new_stitcher(seg_logits.shape[1], padded, weights, image.device, accumulate_on_cpu)
        for index, region in enumerate(regions):
            stitcher.add(seg_logits[index], region)
        if probabilities is not None:
            window_probabilities.append(probabilities.to(stitcher.device))
            volumes.append(lesion_volumes(seg_logits, lesion_channel).to(stitcher.device))
        done += len(batch)
        if on_windows is not None:
            on_windows(len(batch) * len(flips))
    logits = stitcher.result()
    logits = logits[(slice(None), *(slice(b, b + size) for b, size in zip(before, shape)))]
    return WindowPrediction(
        logits=logits[None],
        window_probabilities=torch.cat(window_probabilities) if window_probabilities else None,
        lesion_volumes=torch.cat(volumes) if volumes else torch.zeros(0, device=stitcher.device),
        num_windows=len(positions), sw_batch_size=batch_size, accumulated_on_cpu=stitcher.on_cpu)


def sliding_window_predict(model: nn.Module, image: Tensor, roi_size: Sequence[int], settings: InferenceSettings,
                           *, lesion_channel: int = LESION_LABEL, memory_format: torch.memory_format | None = None,
                           autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """Whole-case prediction of one network, nnU-Net style (:func:`predict_windows`), without the
    predictor's preprocessing, ensembling or coarse-to-fine pass.

    Returns:
        segmentation logits (1, K_seg, Z, Y, X) float32, and the case's subtype probabilities (K,) from
        :func:`aggregate_window_predictions` with ``settings.min_lesion_volume`` (None for a network
        without a head).
    """
    prediction = predict_windows(model, image, roi_size, settings, lesion_channel=lesion_channel,
                                 memory_format=memory_format, autocast_dtype=autocast_dtype)
    return prediction.logits, prediction.class_probabilities(settings.min_lesion_volume)
