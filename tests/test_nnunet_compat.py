"""inference.nnunet_compat (the ``nnunet`` preset): nnU-Net v2's Gaussian map, cubic preprocessing and
logit resampling, each against a hand-made expectation, and the whole path through the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.dataset.preprocessing import PreprocessedCase, preprocess
from pancreas_mtl.evaluation.metrics import lesion_dice, whole_pancreas_dice
from pancreas_mtl.inference.input_grid import restore_original_geometry
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import predict_cases
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.inference.windows import gaussian_importance_map
from tests.conftest import lps_affine
from tests.predict_helpers import CONF, Pointwise, boxes_image, compose_predict, expected_labels, tiny_plan


def test_nnunet_gaussian_is_centred_on_size_over_two_and_cut_at_four_sigma():
    weights = gaussian_importance_map((8, 12, 16), 0.05, nnunet_compat=True)
    assert tuple(int(i) for i in np.unravel_index(int(weights.argmax()), weights.shape)) == (4, 6, 8)
    assert not torch.equal(weights, weights.flip(2))               # even size: half a voxel off the middle
    line = weights[4, 6]                                            # along x: sigma 0.8, cut beyond 3 voxels
    floor = weights.min()
    assert torch.all(line[:5] == floor) and torch.all(line[12:] == floor) and torch.all(line[5:12] > floor)
    assert float(floor) > 0                                         # zeros raised to the smallest weight
    default = gaussian_importance_map((8, 12, 16), 0.05)
    torch.testing.assert_close(default, default.flip(2))            # ours: symmetric


def test_resampling_logits_and_probabilities_disagree_between_classes():
    """Two voxels upsampled to three along x: the middle one is the mean of its neighbours. Mean
    probabilities still say pancreas; mean logits (nnU-Net's order) say lesion."""
    scores = torch.tensor([[0.0, 0.0], [8.0, -8.0], [0.0, 6.0]]).reshape(3, 1, 1, 2)
    case = PreprocessedCase(image=None, seg=None, bbox=((0, 1), (0, 1), (0, 3)), original_shape=(1, 1, 3),
                            original_spacing=(1.0, 1.0, 1.0))
    from_probabilities, _ = restore_original_geometry(scores.softmax(0), case, (1.0, 1.0, 1.5))
    from_logits, probabilities = restore_original_geometry(scores, case, (1.0, 1.0, 1.5), True, logits=True)
    assert from_probabilities.ravel().tolist() == [1, 1, 2] and from_logits.ravel().tolist() == [1, 2, 2]
    np.testing.assert_allclose(probabilities.astype(float).sum(0), 1.0, atol=2e-3)  # softmax after resampling


def test_nnunet_preset_preprocesses_cubically_and_resamples_logits(tmp_path):
    hu = boxes_image()
    path = write_nifti(hu, lps_affine((2.0, 0.8, 0.8)), tmp_path / "in" / "quiz_001_0000.nii.gz")
    cases, _ = find_cases(path)
    config = OmegaConf.to_container(compose_predict(["ckpt=x", "input=y", "output=z", "inference=nnunet"]).inference)
    compat = InferenceSettings.from_config({**config, "roi_size": [16, 32, 32], "mirror_axes": [2]})
    accurate = OmegaConf.to_container(OmegaConf.load(CONF / "inference/accurate.yaml"))
    own = ("name", "nnunet_compat", "engine")  # engine: torch, nnU-Net's arithmetic (no bf16 CPU engine)
    assert compat.nnunet_compat and compat.engine == "torch"
    assert {k: v for k, v in config.items() if k not in own} == \
        {k: v for k, v in accurate.items() if k not in own}   # accurate's windows
    plan = tiny_plan((4.0, 1.0, 1.2))  # z down by 2 (a separate axis), x and y resampled cubically
    predictor = Predictor([Pointwise()], plan, compat, device="cpu")

    loaded = load_case(cases[0])
    image = predictor.preprocess(loaded).image
    np.testing.assert_array_equal(image, preprocess(loaded, plan, image_order=3).image)
    assert np.abs(image - preprocess(loaded, plan).image).max() > 1e-3  # not the linear default

    prediction = predictor.predict_preprocessed(image)
    torch.testing.assert_close(prediction.probabilities, prediction.logits.softmax(0))
    summary = predict_cases(predictor, cases, tmp_path / "out", progress=False, save_probabilities=True)
    assert summary.exit_code == 0
    labels = read_volume(tmp_path / "out" / "quiz_001.nii.gz").array
    assert labels.shape == hu.shape
    expected = expected_labels(hu)
    assert whole_pancreas_dice(labels, expected) > 0.9 and lesion_dice(labels, expected) > 0.8
    saved = np.load(tmp_path / "out" / "quiz_001.npz")["probabilities"].astype(float)
    np.testing.assert_array_equal(saved.argmax(0)[hu != 0], labels[hu != 0])


def test_nnunet_compat_refuses_coarse_to_fine():
    with pytest.raises(ValueError, match="coarse-to-fine"):
        InferenceSettings.from_config({"nnunet_compat": True, "coarse_to_fine": True})
