"""Weights & Biases, in one place: run settings (online or offline, run ids, the runs a checkpoint
names), tables, media and charts, and the runs that log a prediction or an evaluation folder.
Training's loggers and validation media (pancreas_mtl.training) build on it."""
