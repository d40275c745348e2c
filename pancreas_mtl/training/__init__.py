"""Training: the LightningModule, its callbacks (last checkpoint, monitoring, learning curves), loggers
and validation media, optimisers and learning-rate schedules, and the train and tune drivers that the
commands (train.py, tune.py, ``pancreas-mtl train|tune``) run."""
