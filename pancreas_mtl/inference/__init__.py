"""Inference: sliding windows with mirroring, the (ensemble) predictor, export to the input's grid, and
the resumable run over many cases (``python predict.py``; see docs/inference.md).

The modules, in the order a case passes through them: ``settings`` (the presets' schema),
``sources`` (which cases), ``checkpoint`` (networks and plan), ``output_folder`` (whose files are
whose), ``predictor`` (preprocess, windows, coarse-to-fine, ensemble), ``windows`` (where the
windows go), ``sliding_window`` (the network over them), ``export`` (back to the input's grid, atomic
files), ``postprocessing``, ``runner`` (skip finished cases, records, tables, timings). Beside the
predictor: ``engines`` (OpenVINO / ONNX Runtime running the network on the CPU), ``onnx_graph`` (the
network as ONNX, cached on disk) and ``model_folder`` (the deployable folder ``pancreas-mtl export``
writes and ``predict.py ckpt=<folder>`` runs).
"""

from pancreas_mtl.inference.sliding_window import (
    aggregate_window_predictions,
    predict_windows,
    sliding_window_predict,
)
from pancreas_mtl.inference.windows import gaussian_importance_map, window_starts

__all__ = [
    "aggregate_window_predictions",
    "gaussian_importance_map",
    "predict_windows",
    "sliding_window_predict",
    "window_starts",
]
