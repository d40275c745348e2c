"""A trained network as an ONNX file for the CPU engines: one static window shape, cached on disk.

What is exported is the network as the sliding windows use it (:class:`WindowNetwork`): windows
(B, C, Z, Y, X) in, the full-resolution segmentation logits (B, K, Z, Y, X) and, with a head, the
class logits (B, S) out. Probabilities stay in torch (``MultiTaskNet.class_probabilities`` on the
engine's logits), so the engines run exactly the graph the torch forward pass runs.

The exporter is torch's TorchScript one (``dynamo=False``): it needs no extra package, and it exports
every head; the dynamo exporter has no ONNX function for ``adaptive_avg_pool3d`` (the lesion-attention
head's area resampling). Shapes are static (a new window shape is a new file): with dynamic spatial
axes the TorchScript exporter refuses area resampling to a size that is not constant. ``torch.gradient``
(the heads' image statistics) has no ONNX symbolic, so :func:`export_onnx` swaps in the same central
differences written with slicing while it traces, and a ``torch.where`` between boolean masks (which
ONNX Runtime's CPU provider does not implement) becomes the equivalent logical ops.

Files are cached under ``cache_dir/<model key>/<B>x<C>x<Z>x<Y>x<X>.onnx``, the model key being a
digest of the weights, the architecture's settings, torch's version and the ONNX opset: the same
checkpoint is exported once per window shape, by one process at a time (a file lock), and written
atomically, so concurrent predict.py runs share the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor, nn

from pancreas_mtl.files import atomic_path
from pancreas_mtl.models.multitask import MultiTaskNet

log = logging.getLogger(__name__)

OPSET = 17
WINDOW_INPUT = "windows"
SEG_OUTPUT = "seg_logits"
CLASS_OUTPUT = "class_logits"
_SETTING_TYPES = (str, int, float, bool, tuple, list)


class WindowNetwork(nn.Module):
    """A :class:`MultiTaskNet` as the engines run it: windows (B, C, Z, Y, X) -> full-resolution
    segmentation logits (B, K, Z, Y, X), plus class logits (B, S) when the network has a head."""

    def __init__(self, network: MultiTaskNet):
        super().__init__()
        self.network = network

    def forward(self, windows: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        unet = self.network.backbone(windows, deep_supervision=False)
        if self.network.head is None:
            return unet.seg_logits[0]
        return unet.seg_logits[0], self.network.classify(unet, windows)


def output_names(network: MultiTaskNet) -> list[str]:
    return [SEG_OUTPUT] + ([] if network.head is None else [CLASS_OUTPUT])


def _central_differences(values: Tensor, *, spacing=1, dim=None, edge_order: int = 1) -> tuple[Tensor, ...]:
    """``torch.gradient`` for unit spacing and first-order edges, in slicing ops ONNX can express: central
    differences inside, one-sided differences at both ends of each axis."""
    if spacing != 1 or edge_order != 1:
        raise NotImplementedError("the ONNX export writes torch.gradient for unit spacing and edge_order 1 only")
    dims = range(values.ndim) if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    gradients = []
    for axis in dims:
        size = values.shape[axis]
        first = values.narrow(axis, 1, 1) - values.narrow(axis, 0, 1)
        last = values.narrow(axis, size - 1, 1) - values.narrow(axis, size - 2, 1)
        inner = (values.narrow(axis, 2, size - 2) - values.narrow(axis, 0, size - 2)) / 2
        gradients.append(torch.cat([first, inner, last], dim=axis))
    return tuple(gradients)


_torch_where = torch.where


def _logical_where(condition: Tensor, *values, **kwargs):
    """``torch.where`` choosing between two boolean tensors as logical ops (ONNX Runtime has no boolean
    ``Where``); every other call is torch's own."""
    if len(values) == 2 and not kwargs and all(isinstance(v, Tensor) and v.dtype == torch.bool for v in values):
        chosen, other = values
        return (condition & chosen) | (~condition & other)
    return _torch_where(condition, *values, **kwargs)


@contextlib.contextmanager
def _exportable_ops() -> Iterator[None]:
    """While the exporter traces: ``torch.gradient`` as :func:`_central_differences` and boolean
    ``torch.where`` as :func:`_logical_where`, the same values in ops every engine runs."""
    originals = torch.gradient, torch.where
    torch.gradient, torch.where = _central_differences, _logical_where
    try:
        yield
    finally:
        torch.gradient, torch.where = originals


def architecture_settings(network: nn.Module) -> dict:
    """Every module's class and plain settings (pooling, slopes, epsilons, channels): what, besides the
    weights, decides the exported graph."""
    settings = {}
    for name, module in network.named_modules():
        plain = {key: value for key, value in sorted(vars(module).items())
                 if not key.startswith("_") and key != "training" and isinstance(value, _SETTING_TYPES)}
        settings[name or "."] = [type(module).__qualname__, repr(plain)]
    return settings


def model_key(network: nn.Module, weights_digest: str) -> str:
    """The cache folder name of a network: its weights digest and a digest of its architecture's
    settings, torch's version and the opset (another exporter may write another graph)."""
    extra = hashlib.blake2b(repr((architecture_settings(network), torch.__version__, OPSET)).encode(),
                            digest_size=6).hexdigest()
    return f"{weights_digest}-{extra}"


def window_file_name(window_shape: Sequence[int]) -> str:
    """``2x1x64x128x192.onnx`` for windows (B, C, Z, Y, X)."""
    return "x".join(str(int(size)) for size in window_shape) + ".onnx"


def export_onnx(network: MultiTaskNet, window_shape: Sequence[int], path: str | Path) -> Path:
    """Write ``network`` (on the CPU, put in eval mode) for windows of ``window_shape`` (B, C, Z, Y, X) to
    ``path`` as ONNX, atomically. Raises RuntimeError naming the path when the exporter fails."""
    path = Path(path)
    if len(window_shape) != 5 or min(window_shape) < 1:
        raise ValueError(f"window shape must be (B, C, Z, Y, X), each >= 1, got {tuple(window_shape)}")
    module = WindowNetwork(network.eval()).eval()
    example = torch.zeros(tuple(int(size) for size in window_shape))
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings(), _exportable_ops(), \
                torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module, (example,), str(tmp), input_names=[WINDOW_INPUT],
                              output_names=output_names(network), opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
    except Exception as error:  # noqa: BLE001 - the exporter raises many types
        raise RuntimeError(f"exporting the network to ONNX ({path}) failed: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return path


class OnnxCache:
    """ONNX files of one network, one per window shape, under ``folder`` (shared by processes).

    Args:
        network: the network to export (on the CPU).
        folder: this network's cache folder (``cache_dir/<model_key>``).
    """

    def __init__(self, network: MultiTaskNet, folder: str | Path):
        self.network = network
        self.folder = Path(folder)
        self.exported = 0  # files this object wrote (a second predictor on a warm cache writes none)

    def path(self, window_shape: Sequence[int]) -> Path:
        """The ONNX file for windows of ``window_shape`` (B, C, Z, Y, X), exported first if missing."""
        path = self.folder / window_file_name(window_shape)
        if path.is_file():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):  # a concurrent run exporting the same file: wait for it
            if not path.is_file():
                log.info("exporting the network to ONNX for windows %s -> %s", tuple(window_shape), path)
                export_onnx(self.network, window_shape, path)
                self.exported += 1
        return path
