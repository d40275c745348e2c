"""Train a multi-task network: ``python train.py experiment=panda_multistage [key=value ...]``.

The same command as ``pancreas-mtl train ...`` (pancreas_mtl.commands.train, keys in conf/train.yaml);
``python train.py --help`` lists the config groups and keys.
"""

from pancreas_mtl.commands.train import main

if __name__ == "__main__":
    main()
