"""Hydra configs of pancreas_mtl (installed as the package ``pancreas_mtl.conf``; see pancreas_mtl.config)."""
