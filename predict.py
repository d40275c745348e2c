"""Predict masks and lesion subtypes: ``python predict.py ckpt=... input=... output=... [inference=accurate]``.

The same command as ``pancreas-mtl predict ...`` (pancreas_mtl.commands.predict, keys in
conf/predict.yaml; docs/inference.md).
"""

from pancreas_mtl.commands.predict import main

if __name__ == "__main__":
    main()
