"""The predictor: window stitching, mirroring, subtype aggregation, coarse-to-fine, and the way back to the
input's grid (LPS and RAS, anisotropic resampling). The command itself: test_predict_command.py."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.evaluation.metrics import lesion_dice, whole_pancreas_dice
from pancreas_mtl.inference.checkpoint import load_network
from pancreas_mtl.inference.postprocessing import keep_largest_components
from pancreas_mtl.inference.predictor import Predictor
from pancreas_mtl.inference.runner import predict_cases
from pancreas_mtl.inference.sliding_window import lesion_volumes, predict_windows, sliding_window_predict
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.inference.windows import gaussian_importance_map, window_starts
from tests.conftest import lps_affine
from tests.predict_helpers import (
    Pointwise,
    boxes_image,
    expected_labels,
    ras_example,
    save_checkpoint,
    settings,
    tiny_plan,
)

# --- windows --------------------------------------------------------------------------------------------

def test_window_starts_and_gaussian():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(4, 8, 0.5) == [0] and window_starts(16, 16, 0.5) == [0]
    assert window_starts(20, 8, 0.75) == [0, 6, 12]
    weights = gaussian_importance_map((8, 12, 16), 0.125)
    assert weights.shape == (8, 12, 16) and float(weights.max()) == pytest.approx(1.0) and float(weights.min()) > 0
    for dim in range(3):
        torch.testing.assert_close(weights, weights.flip(dim))


@pytest.mark.parametrize("shape, overlap", [((13, 37, 30), 0.5), ((13, 37, 30), 0.0), ((5, 11, 40), 0.25)])
def test_pointwise_model_is_stitched_exactly(shape, overlap):
    """Gaussian weights normalise out: a voxel-wise model gives its own output everywhere, padding included."""
    image = torch.randn(1, 1, *shape)
    logits, probabilities = sliding_window_predict(Pointwise(), image, (8, 16, 16),
                                                   settings(sw_batch_size=3, overlap=overlap))
    expected, _ = Pointwise()(image)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert probabilities.shape == (3,) and float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)


def test_constant_network_gives_constant_logits(tmp_path):
    network, _, _ = load_network(save_checkpoint(tmp_path / "c.ckpt", tiny_plan(), seg_bias=[0.5, 2.0, -1.0],
                                                 class_bias=[0.0, 1.0, 0.0]))
    logits, probabilities = sliding_window_predict(network, torch.randn(1, 1, 11, 30, 21), (8, 16, 16), settings())
    torch.testing.assert_close(logits, torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 11, 30, 21))
    torch.testing.assert_close(probabilities, torch.tensor([0.0, 1.0, 0.0]).softmax(0))


def test_mirroring_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():  # a kernel equal to its flip along every axis: the conv commutes with flips
        kernel = conv.weight.clone()
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        conv.weight.copy_(sum(kernel.flip(dims) for dims in flips) / 8)

    class Symmetric(nn.Module):
        def forward(self, windows):
            seg = conv(windows)
            return seg, seg.mean(dim=(2, 3, 4)).softmax(dim=1)

    image = torch.randn(1, 1, 12, 20, 22)
    plain = predict_windows(Symmetric(), image, (8, 16, 16), settings(overlap=0.5))
    mirrored = predict_windows(Symmetric(), image, (8, 16, 16), settings(overlap=0.5, mirror_axes=(0, 1, 2)))
    torch.testing.assert_close(mirrored.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirrored.class_probabilities(), plain.class_probabilities(), atol=1e-6, rtol=1e-6)
    # a model that is not symmetric does change under mirroring
    asymmetric = nn.Conv3d(1, 3, 3, padding=1)
    wrapped = lambda w: (asymmetric(w), None)  # noqa: E731
    with torch.no_grad():
        assert not torch.allclose(sliding_window_predict(wrapped, image, (8, 16, 16), settings())[0],
                                  sliding_window_predict(wrapped, image, (8, 16, 16), settings(mirror_axes=(2,)))[0])


def test_subtype_follows_the_windows_that_hold_the_lesion():
    """Hand-made windows: only windows over the bright blob predict lesion, and only their vote counts."""
    class BlobVoter(nn.Module):
        def forward(self, windows):
            x = windows[:, :1]
            seg = torch.cat([torch.zeros_like(x), torch.full_like(x, -5.0), 10 * x - 5], dim=1)
            has_blob = (x > 0.5).flatten(1).any(1).float()
            return seg, torch.stack([1 - has_blob, has_blob, torch.zeros_like(has_blob)], dim=1)

    image = torch.zeros(1, 1, 8, 16, 64)
    image[..., 2:5, 3:9, 50:58] = 1.0
    prediction = predict_windows(BlobVoter(), image, (8, 16, 16), settings(overlap=0.0))
    assert prediction.num_windows == 4
    torch.testing.assert_close(prediction.lesion_volumes[:3], torch.zeros(3))
    assert float(prediction.lesion_volumes[3]) == pytest.approx(3 * 6 * 8, rel=1e-2)  # softmax 0.993
    torch.testing.assert_close(prediction.class_probabilities(), torch.tensor([0.0, 1.0, 0.0]))
    # no lesion anywhere: every window votes with the same weight
    empty = predict_windows(BlobVoter(), torch.zeros(1, 1, 8, 16, 64), (8, 16, 16), settings(overlap=0.0))
    torch.testing.assert_close(empty.class_probabilities(), torch.tensor([1.0, 0.0, 0.0]))
    logits = torch.zeros(2, 3, 2, 2, 2)
    logits[0, 2, 0, 0, 0] = 10.0
    torch.testing.assert_close(lesion_volumes(logits), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)


def test_coarse_to_fine_restricts_the_windows_to_the_organ():
    plan = tiny_plan(target_spacing=(1.0, 1.0, 1.0))
    image = torch.full((1, 24, 48, 64), -1.0)
    image[:, 8:14, 20:30, 40:52] = 1.0
    full = Predictor([Pointwise()], plan, settings(), device="cpu").predict_preprocessed(image)
    fastest = Predictor([Pointwise()], plan, settings(coarse_to_fine=True, coarse_margin_mm=4, shrink_window=True),
                        device="cpu").predict_preprocessed(image)
    assert fastest.info["coarse_found"] and fastest.box != ((0, 24), (0, 48), (0, 64))
    (z0, z1), (y0, y1), (x0, x1) = fastest.box
    assert z0 <= 8 - 4 and z1 >= 14 + 4 and y0 <= 16 and y1 >= 34 and x0 <= 36 and x1 >= 56
    assert fastest.windows < full.windows
    torch.testing.assert_close(fastest.probabilities.argmax(0), full.probabilities.argmax(0))
    # a box smaller than the window grows to one window of real image (not zero padding)
    tight = Predictor([Pointwise()], plan, settings(coarse_to_fine=True, coarse_margin_mm=0), device="cpu")
    box = tight.predict_preprocessed(image).box
    assert [stop - start for start, stop in box] == [max(8, 6), 16, 16] and box[1][0] <= 20 and box[1][1] >= 30
    # nothing found: the whole case
    nothing = Predictor([Pointwise()], plan, settings(coarse_to_fine=True), device="cpu").predict_preprocessed(
        torch.full((1, 16, 32, 32), -1.0))
    assert not nothing.info["coarse_found"] and nothing.box == ((0, 16), (0, 32), (0, 32))


def test_keep_largest_components():
    labels = np.zeros((6, 10, 10), dtype=np.uint8)
    labels[1:4, 1:6, 1:6] = 1
    labels[2, 2:4, 2:4] = 2
    labels[2, 5, 5] = 2          # a second lesion, touching the gland
    labels[5, 8:10, 8:10] = 1    # a stray island
    cleaned = keep_largest_components(labels)
    assert cleaned[5].sum() == 0 and cleaned[2, 5, 5] == 1 and (cleaned == 2).sum() == 4
    assert (cleaned > 0).sum() == (labels[:5] > 0).sum()
    np.testing.assert_array_equal(keep_largest_components(labels, pancreas=False, lesion=False), labels)


# --- back to the input's grid ---------------------------------------------------------------------------

@pytest.mark.parametrize("orientation, target_spacing", [("lps", (4.0, 1.0, 1.2)), ("lps", (2.0, 0.8, 0.8)),
                                                         ("ras", (2.5, 3.4, 2.6))])
def test_round_trip_geometry(orientation, target_spacing, tmp_path):
    """Shape, affine and header come back; a voxel-wise model's labels land where the intensities are,
    through anisotropic resampling (a separate z axis in the first case) and the crop."""
    if orientation == "lps":
        hu = boxes_image()
        path = write_nifti(hu, lps_affine((2.0, 0.8, 0.8)), tmp_path / "in" / "quiz_001_0000.nii.gz")
    else:
        path = ras_example(tmp_path / "in", boxes_image(shape=(30, 101, 122), border=0))
        hu = read_volume(path).array
    cases, problems = find_cases(path)
    assert not problems
    predictor = Predictor([Pointwise()], tiny_plan(target_spacing), settings(roi_size=(16, 32, 32)), device="cpu")
    summary = predict_cases(predictor, cases, tmp_path / "out", progress=False)
    assert summary.exit_code == 0
    source, written = nib.load(str(path)), nib.load(str(tmp_path / "out" / f"{cases[0].case_id}.nii.gz"))
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    labels = read_volume(tmp_path / "out" / f"{cases[0].case_id}.nii.gz").array
    expected = expected_labels(hu)
    assert whole_pancreas_dice(labels, expected) > 0.9 and lesion_dice(labels, expected) > 0.8
    assert labels[hu == 0].max() == 0  # outside the crop: background


@pytest.mark.parametrize("orientation", ["lps", "ras"])
def test_constant_network_fills_exactly_the_crop(orientation, tmp_path):
    if orientation == "lps":
        hu = boxes_image(shape=(14, 30, 34), border=3)
        path = write_nifti(hu, lps_affine((2.0, 0.8, 0.8)), tmp_path / "in" / "quiz_002_0000.nii.gz")
    else:
        path = ras_example(tmp_path / "in")
        hu = read_volume(path).array
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan((3.1, 1.3, 0.9) if orientation == "lps"
                                                                else (2.0, 4.0, 5.0)), seg_bias=[0.0, 3.0, 1.0])
    predictor = Predictor.from_checkpoints(checkpoint, settings(roi_size=(16, 32, 32)), device="cpu")
    cases, _ = find_cases(path)
    predict_cases(predictor, cases, tmp_path / "out", progress=False, save_probabilities=True)
    labels = read_volume(tmp_path / "out" / f"{cases[0].case_id}.nii.gz").array
    nonzero = hu != 0
    inside = np.zeros_like(nonzero)
    inside[tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(nonzero))] = True
    np.testing.assert_array_equal(labels, inside.astype(np.uint8))
    saved = np.load(tmp_path / "out" / f"{cases[0].case_id}.npz")
    assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (3, *hu.shape)
    np.testing.assert_allclose(saved["probabilities"][:, inside].astype(float).mean(1),
                               torch.tensor([0.0, 3.0, 1.0]).softmax(0).numpy(), atol=1e-3)
    assert np.all(saved["probabilities"][0][~inside] == 1)
