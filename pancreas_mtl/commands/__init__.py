"""The commands: ``pancreas-mtl <command>`` (cli), the Hydra entry points of train, predict and tune
(also run as train.py, predict.py and tune.py in a checkout), and their one-line refusals. The top
layer: a command may import any layer below it, and nothing imports a command."""
