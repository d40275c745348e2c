"""CPU inference engines: the network run by OpenVINO or ONNX Runtime instead of torch.

``engine`` (a key of the ``conf/inference`` presets) is ``torch``, ``openvino``, ``onnxruntime`` or
``auto``: OpenVINO on the CPU when it is installed (``pip install -e '.[cpu]'``), torch otherwise and
always on GPUs. Asked for by name, a missing engine is an error naming the extra to install; ``auto``
falls back to torch with one info line.

The engine runs the whole network (:mod:`pancreas_mtl.inference.onnx_graph`) behind
:class:`EngineNetwork`, a module with the call contract the sliding windows use for a torch network
(``window_forward``: windows -> segmentation logits and class probabilities), so mirroring, Gaussian
stitching, ensembles, coarse-to-fine and the way back to the input grid are the same code for every
engine. The class probabilities are computed in torch from the engine's class logits, the way the
head defines them.

Precision is ``predict.py``'s ``precision`` knob, read per engine: ``auto`` is bf16 where the CPU
computes it natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists BF16: AVX512_BF16 or AMX) and
fp32 elsewhere; ``bf16`` and ``fp32`` force one. ONNX Runtime runs fp32 only (its CPU provider has no
bf16 convolutions); fp16 is a GPU precision.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pancreas_mtl.inference.onnx_graph import OnnxCache, model_key
from pancreas_mtl.inference.settings import ENGINES
from pancreas_mtl.models.multitask import MultiTaskNet

log = logging.getLogger(__name__)

CPU_ENGINES = ("openvino", "onnxruntime")
ENGINE_PRECISIONS = ("auto", "fp32", "bf16")
INSTALL_HINT = "pip install -e '.[cpu]' (the cpu extra: openvino, onnxruntime)"


class EngineUnavailable(ImportError):
    """An engine asked for by name whose package is not installed."""


def import_engine(engine: str):
    """The engine's Python package (``openvino`` or ``onnxruntime``); ImportError when it is missing."""
    return importlib.import_module(engine)


def _installed(engine: str) -> bool:
    try:
        import_engine(engine)
    except ImportError:
        return False
    return True


def resolve_engine(requested: str, device: torch.device, torch_possible: bool = True) -> str:
    """The engine that runs: ``requested``, or for ``auto`` OpenVINO on the CPU when installed, else torch.

    Args:
        requested: ``auto``, ``torch``, ``openvino`` or ``onnxruntime``.
        device: the predictor's device; GPUs run torch.
        torch_possible: False when a member is an exported model folder, which only the CPU engines run
            (``auto`` then takes OpenVINO, else ONNX Runtime).

    Raises:
        EngineUnavailable: ``openvino`` / ``onnxruntime`` asked for by name and not installed.
        ValueError: an unknown engine, a CPU engine on a GPU, or torch for an exported model folder.
    """
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {requested!r}")
    if device.type != "cpu":
        if requested in CPU_ENGINES or not torch_possible:
            raise ValueError(f"engine {requested if requested in CPU_ENGINES else 'openvino/onnxruntime'} runs on "
                             f"the CPU, the device is {device}: use device=cpu, or on GPUs the training checkpoint "
                             "with inference.engine=torch (or auto)")
        return "torch"
    if requested == "torch":
        if not torch_possible:
            raise ValueError("an exported model folder runs with inference.engine=openvino or onnxruntime (or "
                             "auto), not torch; predict from the training checkpoint for torch")
        return "torch"
    if requested == "auto":
        for engine in ("openvino",) if torch_possible else CPU_ENGINES:
            if _installed(engine):
                return engine
        if not torch_possible:
            raise EngineUnavailable(f"an exported model folder needs OpenVINO or ONNX Runtime: {INSTALL_HINT}")
        log.info("inference.engine=auto: OpenVINO is not installed, predicting with torch (for CPU inference up "
                 "to 10x faster: %s)", INSTALL_HINT)
        return "torch"
    if not _installed(requested):
        raise EngineUnavailable(f"inference.engine={requested} needs the {requested} package, which is not "
                                f"installed: {INSTALL_HINT}; or inference.engine=auto (torch when OpenVINO is "
                                "missing) or torch")
    return requested


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively: OpenVINO's CPU capabilities list BF16 (AVX512_BF16 or
    AMX), or without OpenVINO, /proc/cpuinfo has the ``avx512_bf16`` or ``amx_bf16`` flag."""
    try:
        capabilities = import_engine("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return "BF16" in capabilities
    except (ImportError, RuntimeError):
        pass
    try:
        flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for flag in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_engine_precision(precision: str, engine: str) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (predict.py's ``auto | bf16 | fp16 | fp32``) means for a CPU
    engine (see the module docstring); ValueError for a precision the engine does not run."""
    if precision not in (*ENGINE_PRECISIONS, "fp16"):
        raise ValueError(f"precision must be one of auto, bf16, fp16, fp32, got {precision!r}")
    if precision == "fp16":
        raise ValueError(f"precision=fp16 is a GPU precision; engine {engine} on the CPU runs bf16 or fp32 "
                         "(inference.engine=torch for torch's fp16 autocast on the CPU)")
    if engine == "onnxruntime":
        if precision == "bf16":
            raise ValueError("engine onnxruntime runs fp32 on the CPU; use precision=fp32 (or auto), or "
                             "inference.engine=openvino for bf16")
        return "fp32"
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_bf16():
        log.warning("precision=bf16: this CPU has no native bf16 (AVX512_BF16 or AMX); OpenVINO runs fp32")
    return precision


class _OpenVINORunner:
    """A compiled OpenVINO model: (B, C, Z, Y, X) float32 array -> its outputs as arrays."""

    def __init__(self, model_file: Path, precision: str, threads: int | None, cache_dir: Path | None):
        openvino = import_engine("openvino")
        core = openvino.Core()
        if cache_dir is not None:  # OpenVINO's own cache of compiled models: a second run compiles in seconds
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(str(model_file), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, windows: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: windows})
        return [self.request.get_output_tensor(index).data.copy() for index in range(len(self.compiled.outputs))]


class _OnnxRuntimeRunner:
    """An ONNX Runtime session on the CPU: (B, C, Z, Y, X) float32 array -> its outputs as arrays."""

    def __init__(self, model_file: Path, threads: int | None):
        onnxruntime = import_engine("onnxruntime")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, windows: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: windows})


# (B, C, Z, Y, X) window shape -> the model file an engine reads for it (ONNX, or OpenVINO IR)
ModelSource = Callable[[tuple[int, ...]], Path]


class EngineNetwork(nn.Module):
    """A network run by a CPU engine, called like the torch network by the sliding windows.

    Calls of any number of windows run in batches of ``batch_size`` (the compiled, static batch). A last
    partial batch runs through a model compiled for its own size where the source can export one
    (``exact_batches``: a checkpoint's network; a case of one window then costs one window, not
    ``batch_size``), else it is padded with zero windows whose outputs are dropped (an exported folder
    has one shape; every layer works per window: instance normalisation, per-window pooling). A model is
    compiled once per window shape and kept.

    Args:
        engine: ``openvino`` or ``onnxruntime``.
        precision: ``fp32`` or ``bf16`` (:func:`resolve_engine_precision`).
        batch_size: windows per engine call.
        source: the model file for a window shape (B, C, Z, Y, X) (an ``OnnxCache`` or a model folder).
        probabilities: (B, S) class logits -> probabilities, the head's definition; None without a head.
        threads: engine threads (OpenVINO's INFERENCE_NUM_THREADS); None: the engine's default.
        compiled_cache: OpenVINO's CACHE_DIR for compiled models; None: none.
        exact_batches: ``source`` gives models of any batch size (a last partial batch is not padded).
    """

    def __init__(self, engine: str, precision: str, batch_size: int, source: ModelSource,
                 probabilities: Callable[[Tensor], Tensor] | None, threads: int | None = None,
                 compiled_cache: str | Path | None = None, exact_batches: bool = False):
        super().__init__()
        if engine not in CPU_ENGINES or precision not in ("fp32", "bf16"):
            raise ValueError(f"an engine network runs openvino/onnxruntime at fp32/bf16, got {engine} {precision}")
        self.engine, self.precision, self.batch_size = engine, precision, int(batch_size)
        self.source, self.probabilities, self.threads = source, probabilities, threads
        self.compiled_cache = None if compiled_cache is None else Path(compiled_cache)
        self.exact_batches = bool(exact_batches)
        self._runners: dict[tuple[int, ...], Callable[[np.ndarray], list[np.ndarray]]] = {}

    def extra_repr(self) -> str:
        return f"engine={self.engine}, precision={self.precision}, batch_size={self.batch_size}"

    def runner(self, window_shape: Sequence[int]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The compiled model for windows (B, C, Z, Y, X), compiled on first use."""
        key = tuple(int(size) for size in window_shape)
        if key not in self._runners:
            model_file = self.source(key)
            if self.engine == "openvino":
                if self.compiled_cache is not None:
                    self.compiled_cache.mkdir(parents=True, exist_ok=True)
                self._runners[key] = _OpenVINORunner(model_file, self.precision, self.threads, self.compiled_cache)
            else:
                self._runners[key] = _OnnxRuntimeRunner(model_file, self.threads)
        return self._runners[key]

    @torch.no_grad()
    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor | None]:
        """windows (N, C, Z, Y, X) -> (segmentation logits (N, K, Z, Y, X) float32, class probabilities
        (N, S) or None), on the windows' device."""
        count, shape = windows.shape[0], tuple(windows.shape[1:])
        seg_parts, class_parts = [], []
        for start in range(0, count, self.batch_size):
            batch = windows[start:start + self.batch_size].detach().float().cpu()
            used = batch.shape[0]
            if used < self.batch_size and not self.exact_batches:
                batch = torch.cat([batch, batch.new_zeros((self.batch_size - used, *shape))])
            outputs = self.runner(tuple(batch.shape))(np.ascontiguousarray(batch.numpy()))
            seg_parts.append(torch.from_numpy(outputs[0][:used]))
            if len(outputs) > 1:
                class_parts.append(torch.from_numpy(outputs[1][:used]))
        seg_logits = torch.cat(seg_parts).to(windows.device)
        if self.probabilities is None or not class_parts:
            return seg_logits, None
        return seg_logits, self.probabilities(torch.cat(class_parts).to(windows.device))


def compiled_cache_dir(engine_cache: str | Path | None) -> Path | None:
    """OpenVINO's CACHE_DIR of compiled models under ``engine_cache`` (None: no disk cache)."""
    return None if engine_cache is None else Path(engine_cache).expanduser() / "openvino"


def torch_engine_network(network: MultiTaskNet, weights_digest: str, engine: str, precision: str, batch_size: int,
                         threads: int | None = None, engine_cache: str | Path | None = None) -> EngineNetwork:
    """``network`` (on the CPU) run by ``engine``: exported to ONNX per window shape into
    ``engine_cache/onnx/<model key>/`` (a temporary folder, removed with the network, when None),
    compiled models in ``engine_cache/openvino/``."""
    if not isinstance(network, MultiTaskNet):
        raise ValueError(f"engine {engine} runs a MultiTaskNet (or an exported model folder), got "
                         f"{type(network).__name__}; use inference.engine=torch for other modules")
    temporary = None
    if engine_cache is None:
        temporary = tempfile.TemporaryDirectory(prefix="pancreas_mtl_onnx_")
        folder = Path(temporary.name)
    else:
        folder = Path(engine_cache).expanduser() / "onnx" / model_key(network, weights_digest)
    cache = OnnxCache(network.cpu().eval(), folder)
    probabilities = None if network.head is None else network.class_probabilities
    wrapped = EngineNetwork(engine, resolve_engine_precision(precision, engine), batch_size, cache.path,
                            probabilities, threads, compiled_cache_dir(engine_cache), exact_batches=True)
    wrapped.onnx_cache, wrapped.temporary_folder = cache, temporary  # kept alive with the network
    return wrapped
