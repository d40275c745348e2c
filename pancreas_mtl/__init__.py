"""pancreas_mtl: multi-task 3D CT segmentation (pancreas, lesion) and lesion subtype classification."""

__version__ = "0.1.0"
