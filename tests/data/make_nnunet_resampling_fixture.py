"""Writes tests/data/nnunet_resampling.npz: nnU-Net v2's own image resampling of a small random volume.

    .venv-nnunet/bin/python tests/data/make_nnunet_resampling_fixture.py   # after bench/nnunet_env.sh

tests/test_resampling.py checks ``resample_image(..., order=3)`` against these arrays, so the
test suite needs no nnU-Net install. Cases: (new shape (z, y, x), separate axis or None).
"""

from pathlib import Path

import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

CASES = [((9, 14, 7), None), ((11, 13, 12), 0), ((4, 9, 16), 0), ((6, 5, 12), 2)]

rng = np.random.default_rng(0)
image = (rng.normal(size=(2, 6, 10, 9)) * 100).astype(np.float32)
arrays = {"image": image}
for index, (shape, axis) in enumerate(CASES):
    arrays[f"shape{index}"] = np.array(shape)
    arrays[f"axis{index}"] = np.array(-1 if axis is None else axis)
    arrays[f"expected{index}"] = resample_data_or_seg(image, shape, is_seg=False, axis=axis, order=3,
                                                      do_separate_z=axis is not None, order_z=0)
np.savez_compressed(Path(__file__).with_name("nnunet_resampling.npz"), **arrays)
