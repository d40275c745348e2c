"""The predictor: one network or an ensemble, a case in, class probabilities on the plan's grid out.

A case goes through ``preprocess`` exactly as in training (crop, normalise, resample), then through
sliding windows (:mod:`pancreas_mtl.inference.sliding_window`) on the device, optionally in two
passes (coarse-to-fine, below). An ensemble averages the members' softmax probabilities and subtype
probabilities; its members must share what the voxels and outputs mean (target spacing,
normalisation, channels, labels, subtypes), while their networks and patch sizes may differ.

Coarse-to-fine (``coarse_to_fine``, the ``fastest`` preset, after the FLARE winners): the
preprocessed image is averaged down by ``coarse_factor``, one pass of the same network over it (no
mirroring) predicts where the pancreas is, and the full-resolution windows run only over the bounding
box of the predicted pancreas and lesion grown by ``coarse_margin_mm``; outside it the prediction is
background. When the coarse pass finds nothing, the whole case is predicted.

nnU-Net compatibility (``nnunet_compat``, the ``nnunet`` preset): three choices where we differ from
nnU-Net v2's predictor on purpose are switched to its own, so that the same weights give its masks:
cubic instead of linear image resampling in preprocessing, its Gaussian map (see
``gaussian_importance_map``), and logits instead of probabilities averaged over an ensemble and
resampled to the input grid (``Prediction.logits``; docs/inference.md says why ours differ).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pancreas_mtl.raw.checks import LoadedCase
from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.dataset.preprocessing import PreprocessedCase, preprocess
from pancreas_mtl.devices import resolve_device, set_tf32
from pancreas_mtl.inference.checkpoint import load_predictable
from pancreas_mtl.inference.engines import compiled_cache_dir, resolve_engine, torch_engine_network
from pancreas_mtl.inference.model_folder import ExportedModel
from pancreas_mtl.inference.settings import InferenceSettings
from pancreas_mtl.inference.sliding_window import predict_windows
from pancreas_mtl.inference.windows import check_window_count, count_windows
from pancreas_mtl.models.multitask import MultiTaskNet
from pancreas_mtl.planning.plan import LESION_LABEL, Plan

PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what ensemble members must agree on: the voxels they read and what their outputs mean
SHARED_PLAN_KEYS = ("target_spacing", "normalization", "num_input_channels", "num_classes", "num_subtypes",
                    "labels", "anisotropic_axis", "anisotropy_threshold")
# window forward passes above which a case gets its own progress bar (fewer take seconds, even on a CPU)
WINDOW_BAR_MIN_PASSES = 64


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on GPUs that have it, else fp16 on GPUs, and float32 on CPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if precision == "fp32" else PRECISIONS[precision]


def check_plans_match(plans: Sequence[Plan], names: Sequence[str]) -> None:
    """Ensemble members must read the same voxels and mean the same by their outputs; raises ValueError
    naming the members and the differing plan entries."""
    reference = plans[0].to_dict()
    differences = []
    for plan, name in zip(plans[1:], names[1:]):
        other = plan.to_dict()
        for key in SHARED_PLAN_KEYS:
            if reference[key] != other[key]:
                differences.append(f"  {key}: {reference[key]} ({names[0]}) vs {other[key]} ({name})")
    if differences:
        raise ValueError("ensemble members must share their plan's preprocessing and outputs; these differ:\n"
                         + "\n".join(differences))


def weights_digest(network: nn.Module) -> str:
    """A short digest of a network's class and weights: equal for copies of one checkpoint, different for
    any other weights."""
    digest = hashlib.blake2b(type(network).__qualname__.encode(), digest_size=12)
    for key, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Member:
    """One network of the ensemble with its window geometry."""

    network: nn.Module
    patch_size: tuple[int, int, int]
    divisor: tuple[int, int, int]
    name: str = ""
    digest: str = ""     # weights digest of a network run by an engine (whose module holds no weights)
    precision: str = ""  # the engine's fp32 / bf16; "" for torch


@dataclass
class Prediction:
    """A case's prediction on the plan's grid.

    Attributes:
        probabilities: (K, Z, Y, X) float32 class probabilities (ensemble mean), on the device (on the CPU
            after an out-of-memory fallback).
        subtype_probabilities: (K_subtypes,) float32 on the CPU, or None for segmentation-only networks.
        windows: full-resolution window forward passes (windows x mirror passes x networks).
        box: (z, y, x) [start, stop) region the full-resolution windows covered (the whole case unless
            coarse-to-fine found a box).
        logits: with ``nnunet_compat``, the (K, Z, Y, X) ensemble-mean logits that ``probabilities`` is
            the softmax of (nnU-Net resamples these, not the probabilities); None otherwise.
    """

    probabilities: Tensor
    subtype_probabilities: Tensor | None
    windows: int
    box: tuple[tuple[int, int], ...]
    info: dict = field(default_factory=dict)
    logits: Tensor | None = None


class Predictor:
    """Predicts preprocessed cases with one network or an ensemble.

    Args:
        networks: trained networks (``MultiTaskNet``, or modules returning (seg logits, class probabilities)),
            or exported model folders (:class:`~pancreas_mtl.inference.model_folder.ExportedModel`).
        plans: the plan of each network (one plan is used for all).
        settings: window settings (:class:`InferenceSettings`, a composed ``conf/inference`` preset);
            None: ``accurate``'s.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        precision: "auto" (bf16/fp16 autocast on GPUs, float32 on CPUs), "bf16", "fp16" or "fp32"; for the
            CPU engines "auto" is bf16 where the CPU has it (``engines.resolve_engine_precision``).
        tf32: TF32 matmuls/convolutions on GPUs.
        channels_last: channels-last 3D weights and windows (recent GPUs).
        names: a name per network (checkpoint paths), for errors and records.
        limits: plausible input spacing and the most voxels read or resampled (``conf/limits/``);
            None: :class:`InputLimits` defaults.
        engine_cache: folder of the engines' ONNX exports and compiled models, reused by later runs; None:
            a temporary folder (a network in memory whose weights change, e.g. in training, must not be
            cached by digest). The engine runs the weights as they are when the predictor is built.
        num_threads: the engine's CPU threads (None: torch's thread count); torch's are set by the caller.
        progress: a tqdm bar over the windows of a case with more than ``WINDOW_BAR_MIN_PASSES`` window
            forward passes (predict.py's ``progress``).
    """

    def __init__(self, networks: Sequence[nn.Module], plans: Plan | Sequence[Plan],
                 settings: InferenceSettings | None = None, device: str | torch.device = "auto",
                 precision: str = "auto", tf32: bool = True, channels_last: bool = False,
                 names: Sequence[str] | None = None, limits: InputLimits | None = None,
                 engine_cache: str | Path | None = None, num_threads: int | None = None, progress: bool = False):
        if not networks:
            raise ValueError("no network to predict with")
        plans = [plans] * len(networks) if isinstance(plans, Plan) else list(plans)
        names = list(names) if names is not None else [f"network {i}" for i in range(len(networks))]
        if len(plans) != len(networks) or len(names) != len(networks):
            raise ValueError(f"{len(networks)} networks but {len(plans)} plans and {len(names)} names")
        check_plans_match(plans, names)
        self.plan = plans[0]
        self.settings = settings or InferenceSettings.preset("accurate")
        self.limits = limits or InputLimits.defaults()
        self.device = resolve_device(device)
        self.progress = progress
        exported = [isinstance(network, ExportedModel) for network in networks]
        requested = self.settings.engine
        if requested == "auto" and not all(isinstance(n, (MultiTaskNet, ExportedModel)) for n in networks):
            requested = "torch"  # other modules (the tests' stubs) have no export to run
        self.engine = resolve_engine(requested, self.device, torch_possible=not any(exported))
        self.autocast_dtype = resolve_precision(precision, self.device) if self.engine == "torch" else None
        self.memory_format = torch.channels_last_3d if channels_last else None
        if self.device.type == "cuda" and tf32:
            set_tf32(True)
        self.members = []
        num_threads = num_threads or torch.get_num_threads()  # an engine uses as many threads as torch
        for network, plan, name in zip(networks, plans, names):
            divisor = tuple(math.prod(stride[axis] for stride in plan.strides) for axis in range(3))
            patch_size, digest = tuple(plan.patch_size), ""
            if isinstance(network, ExportedModel):
                patch_size, digest = self._exported_window(network), network.digest
                network = network.engine_network(self.engine, precision, num_threads, compiled_cache_dir(engine_cache))
            elif self.engine != "torch":
                digest = weights_digest(network)
                network = torch_engine_network(network, digest, self.engine, precision, self.settings.sw_batch_size,
                                               num_threads, engine_cache)
            network = network.to(self.device).eval()
            if channels_last:
                network = network.to(memory_format=torch.channels_last_3d)
            self.members.append(Member(network, patch_size, divisor, name, digest,
                                       getattr(network, "precision", "")))
        self.lesion_channel = int(self.plan.labels.get("lesion", LESION_LABEL))
        # out-of-memory fallbacks (sliding_window.predict_windows) carry over to the following cases
        self.sw_batch_size = self.settings.sw_batch_size
        self.accumulate_on_cpu = False

    @classmethod
    def from_checkpoints(cls, paths: str | Path | Sequence[str | Path], settings: InferenceSettings | None = None,
                         device: str | torch.device = "auto", **kwargs) -> Predictor:
        """A predictor for one checkpoint or an ensemble of them (read with weights_only)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        loaded = [load_predictable(path) for path in paths]
        return cls([network for network, _ in loaded], [plan for _, plan in loaded], settings, device,
                   names=[str(path) for path in paths], **kwargs)

    def _exported_window(self, exported: ExportedModel) -> tuple[int, int, int]:
        """The (z, y, x) window an exported model folder runs; ValueError for settings asking for others."""
        window = tuple(exported.window_shape[2:])
        settings = self.settings
        if settings.shrink_window or settings.coarse_to_fine or settings.roi_size not in (None, window):
            raise ValueError(f"{exported.folder}: an exported model runs its windows {list(window)} only; preset "
                             f"{settings.name} asks for other shapes (shrink_window, coarse_to_fine or roi_size "
                             f"{settings.roi_size}); use inference=fast or accurate, or the training checkpoint")
        return window

    def describe_engine(self) -> str:
        """``torch float32``, ``openvino bf16``, ...: what runs the windows, for logs."""
        if self.engine == "torch":
            return f"torch {str(self.autocast_dtype or torch.float32).removeprefix('torch.')}"
        return f"{self.engine} {','.join(sorted({member.precision for member in self.members}))}"

    def identity(self) -> dict:
        """What decides this predictor's outputs, for an output folder's record (``output_folder``): a
        digest of each network's weights, the plan, the inference settings and the autocast precision."""
        # the window cap refuses cases but changes no voxel: raising it must not disown a finished folder
        inference = {key: value for key, value in self.settings.to_dict().items() if key != "max_windows_per_case"}
        precision = (str(self.autocast_dtype or torch.float32).removeprefix("torch.") if self.engine == "torch"
                     else ",".join(sorted({member.precision for member in self.members})))
        return {"networks": [member.digest or weights_digest(member.network) for member in self.members],
                "plan": self.plan.to_dict(), "inference": inference, "engine": self.engine,
                "precision": precision}

    # --- steps --------------------------------------------------------------------------------------

    def preprocess(self, loaded: LoadedCase) -> PreprocessedCase:
        """The training preprocessing (crop, normalise, resample) of a loaded case."""
        if loaded.image.shape[0] != self.plan.num_input_channels:
            raise DataError(loaded.case.image_paths[0], f"the network reads {self.plan.num_input_channels} "
                            f"channel(s), the case has {loaded.image.shape[0]}", loaded.case.case_id)
        return preprocess(loaded, self.plan, image_order=3 if self.settings.nnunet_compat else 1,
                          max_resampled_voxels=self.limits.max_resampled_voxels, device=self.device)

    def window_for(self, member: Member, shape: Sequence[int], shrink: bool | None = None) -> tuple[int, int, int]:
        """The window for a region of ``shape``: the configured one or the plan's patch, shrunk to the
        region (rounded up to the network's divisibility) with ``shrink`` (default ``shrink_window``)."""
        window = self.settings.roi_size or member.patch_size
        if self.settings.shrink_window if shrink is None else shrink:
            window = tuple(min(w, math.ceil(s / d) * d) for w, s, d in zip(window, shape, member.divisor))
        return tuple(int(w) for w in window)

    @torch.no_grad()
    def _ensemble(self, image: Tensor, settings: InferenceSettings, shrink: bool | None = None,
                  case_id: str | None = None, desc: str = "windows") -> tuple[Tensor, Tensor | None, int]:
        """Mean softmax probabilities (K, Z, Y, X) and subtype probabilities of every member over ``image``
        with the windows of ``settings`` (this predictor's, or the coarse pass's), and the number of window
        forward passes (windows x mirror passes, summed over members). With ``nnunet_compat`` the first
        is the members' mean logits instead. Every member's window count is checked against
        ``max_windows_per_case`` before the first one runs (:class:`TooManyWindowsError` naming ``case_id``)."""
        compat = settings.nnunet_compat
        shape = tuple(image.shape[2:])
        windows_of = [self.window_for(member, shape, shrink) for member in self.members]
        counts = [count_windows(shape, window, settings.overlap) for window in windows_of]
        for count, window in zip(counts, windows_of):
            check_window_count(count, shape, window, settings, case_id)
        passes = sum(counts) * 2 ** len(set(settings.mirror_axes))
        score_sum, subtype_sum, windows = None, None, 0
        with tqdm(total=passes, desc=f"{case_id} {desc}" if case_id else desc, unit="window", leave=False,
                  disable=not self.progress or passes <= WINDOW_BAR_MIN_PASSES) as bar:
            for member, window in zip(self.members, windows_of):
                result = predict_windows(member.network, image, window, settings, sw_batch_size=self.sw_batch_size,
                                         lesion_channel=self.lesion_channel, memory_format=self.memory_format,
                                         autocast_dtype=self.autocast_dtype, case_id=case_id,
                                         accumulate_on_cpu=self.accumulate_on_cpu, on_windows=bar.update)
                self.sw_batch_size = min(self.sw_batch_size, result.sw_batch_size)
                self.accumulate_on_cpu = self.accumulate_on_cpu or result.accumulated_on_cpu
                scores = result.logits[0] if compat else result.logits[0].softmax(dim=0)  # logits or probabilities
                if score_sum is not None and score_sum.device != scores.device:
                    score_sum = score_sum.cpu()  # a member fell back to the CPU: the sum follows
                    scores = scores.cpu()
                score_sum = scores if score_sum is None else score_sum.add_(scores)
                subtypes = result.class_probabilities(settings.min_lesion_volume)
                if subtypes is not None:
                    subtype_sum = subtypes if subtype_sum is None else subtype_sum + subtypes
                windows += result.num_windows * 2 ** len(set(settings.mirror_axes))
        count = len(self.members)
        return score_sum / count, (None if subtype_sum is None else subtype_sum / count), windows

    @torch.no_grad()
    def coarse_box(self, image: Tensor, case_id: str | None = None
                   ) -> tuple[tuple[tuple[int, int], ...] | None, int]:
        """(z, y, x) [start, stop) box of the pancreas and lesion found by the coarse pass, grown by the
        margin, on the full-resolution grid of ``image`` (1, C, Z, Y, X) (None when nothing is found),
        and the coarse pass's window count."""
        shape = tuple(image.shape[2:])
        factor = self.settings.coarse_factor
        coarse_shape = tuple(max(1, round(s / f)) for s, f in zip(shape, factor))
        coarse = F.interpolate(image, size=coarse_shape, mode="area") if coarse_shape != shape else image
        # the coarse image is small: windows just covering it, not padded up to the patch
        coarse_settings = replace(self.settings, overlap=self.settings.coarse_overlap, mirror_axes=())
        probabilities, _, windows = self._ensemble(coarse, coarse_settings, shrink=True, case_id=case_id,
                                                   desc="coarse windows")
        foreground = probabilities.argmax(dim=0) > 0
        if not foreground.any():
            return None, windows
        coordinates = foreground.nonzero()
        low, high = coordinates.min(0).values.tolist(), coordinates.max(0).values.tolist()
        scale = [s / c for s, c in zip(shape, coarse_shape)]
        margin = [math.ceil(self.settings.coarse_margin_mm / spacing) for spacing in self.plan.target_spacing]
        box = tuple((max(0, math.floor(lo * k) - m), min(s, math.ceil((hi + 1) * k) + m))
                    for lo, hi, k, m, s in zip(low, high, scale, margin, shape))
        return box, windows

    def _coarse_pass_helps(self, shape: Sequence[int]) -> bool:
        """Whether a coarse pass can save anything on a case of ``shape``: not when the case fits in one
        full-resolution window of every member, nor when the coarse image is so small that a network's
        deepest stage would see a single voxel (instance normalisation is undefined there)."""
        coarse_shape = [max(1, round(s / f)) for s, f in zip(shape, self.settings.coarse_factor)]
        for member in self.members:
            if any(s > w for s, w in zip(shape, self.window_for(member, shape, shrink=False))):
                coarse_window = self.window_for(member, coarse_shape, shrink=True)
                return math.prod(w // d for w, d in zip(coarse_window, member.divisor)) > 1
        return False

    def _at_least_one_window(self, box: tuple[tuple[int, int], ...], shape: Sequence[int]
                             ) -> tuple[tuple[int, int], ...]:
        """``box`` grown (about its centre, within the case) to at least the largest member's window, so
        the windows see the real image around the organ rather than zero padding."""
        window = [max(self.window_for(member, [stop - start for start, stop in box])[axis]
                      for member in self.members) for axis in range(3)]
        grown = []
        for (start, stop), size, length in zip(box, window, shape):
            target = min(size, length)
            if stop - start < target:
                start = min(max(start - (target - (stop - start)) // 2, 0), length - target)
                stop = start + target
            grown.append((start, stop))
        return tuple(grown)

    @torch.no_grad()
    def predict_preprocessed(self, image: np.ndarray | Tensor, case_id: str | None = None) -> Prediction:
        """image (C, Z, Y, X) on the plan's grid -> :class:`Prediction` (probabilities on the device);
        ``case_id`` names the case in errors and on the progress bar."""
        image = torch.as_tensor(image, dtype=torch.float32).to(self.device)[None]
        shape = tuple(image.shape[2:])
        box = tuple((0, s) for s in shape)
        info = {}
        if self.settings.coarse_to_fine and self._coarse_pass_helps(shape):
            found, coarse_windows = self.coarse_box(image, case_id)
            info.update(coarse_found=found is not None, coarse_windows=coarse_windows)
            if found is not None:
                box = self._at_least_one_window(found, shape)
        elif self.settings.coarse_to_fine:
            info.update(coarse_skipped="the case is too small for a coarse pass")
        region = tuple(slice(start, stop) for start, stop in box)
        region_image = image[(slice(None), slice(None), *region)]
        probabilities, subtypes, windows = self._ensemble(region_image, self.settings, case_id=case_id)
        if box != tuple((0, s) for s in shape):
            full = torch.zeros((probabilities.shape[0], *shape), dtype=probabilities.dtype,
                               device=probabilities.device)
            full[0] = 1.0  # outside the box: background
            full[(slice(None), *region)] = probabilities
            probabilities = full
        if self.sw_batch_size != self.settings.sw_batch_size or self.accumulate_on_cpu:  # ran out of memory
            info.update(sw_batch_size=self.sw_batch_size, sums_on_cpu=self.accumulate_on_cpu)
        subtypes = None if subtypes is None else subtypes.cpu()
        if self.settings.nnunet_compat:  # no coarse box here (from_config refuses it): the whole case
            return Prediction(probabilities.softmax(dim=0), subtypes, windows, box, info, logits=probabilities)
        return Prediction(probabilities, subtypes, windows, box, info)

    def synchronize(self) -> None:
        """Wait for the device (for honest timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
