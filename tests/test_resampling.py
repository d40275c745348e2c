"""Resampling: shapes, the separate-axis rule and its threshold, label preservation, preprocessing order,
and resampling back at export."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pancreas_mtl.raw.checks import LoadedCase
from pancreas_mtl.raw.layout import Case
from pancreas_mtl.dataset.preprocessing import (
    PreprocessedCase,
    normalize,
    preprocess,
    sample_foreground_locations,
)
from pancreas_mtl.dataset.resampling import resample_image, resample_segmentation, resampled_shape
from pancreas_mtl.inference.input_grid import restore_original_geometry
from pancreas_mtl.planning.anisotropy import separate_axis
from pancreas_mtl.planning.plan import ChannelNormalization, Plan
from tests.conftest import lps_affine, make_case_arrays


def small_plan(target_spacing=(2.0, 0.8, 0.8), **changes) -> Plan:
    return Plan(preset="test", target_spacing=target_spacing, median_shape=(12, 28, 36), patch_size=(8, 16, 16),
                batch_size=2, normalization=[ChannelNormalization("ct", -50.0, 150.0, 80.0, 40.0)],
                kernel_sizes=[(1, 3, 3), (3, 3, 3)], strides=[(1, 1, 1), (2, 2, 2)], features_per_stage=[4, 8],
                n_blocks_per_stage=[1, 1], n_conv_per_stage_decoder=[1], **changes)


def test_resampled_shape_keeps_extent():
    assert resampled_shape((60, 119, 184), (2.0, 0.74, 0.74), (4.0, 1.48, 1.48)) == (30, 60, 92)


@pytest.mark.parametrize("spacing, target, expected", [
    ((5.0, 0.7, 0.7), (5.0, 0.7, 0.7), 0),
    ((2.0, 0.74, 0.74), (2.0, 0.73, 0.73), None),
    ((0.7, 0.7, 4.0), (0.7, 0.7, 0.7), 2),
    ((0.7, 0.7, 0.7), (0.7, 0.7, 4.0), 2),    # the target grid decides when the source is isotropic
    ((4.0, 1.0, 1.0), (1.0, 1.0, 4.0), 0),    # both anisotropic: the source decides (nnU-Net's order)
    ((1.0, 1.0, 4.0), (4.0, 1.0, 1.0), 2),
    ((3.0, 3.0, 0.8), (3.0, 3.0, 0.8), None),  # two coarsest axes: none separate (get_lowres_axis)
    ((3.0, 3.0, 0.8), (4.0, 1.0, 1.0), None),  # ... and the target is not asked (nnU-Net)
])
def test_separate_axis(spacing, target, expected):
    assert separate_axis(spacing, target) == expected


def test_separate_axis_threshold():
    assert separate_axis((2.0, 0.8, 0.8), (2.0, 0.8, 0.8)) is None        # 2.5 x: not above nnU-Net's 3
    assert separate_axis((2.0, 0.8, 0.8), (2.0, 0.8, 0.8), threshold=2.0) == 0
    assert separate_axis((5.0, 0.7, 0.7), (5.0, 0.7, 0.7), threshold=8.0) is None


def test_identity_resampling_is_exact():
    image = torch.randn(2, 5, 6, 7)
    assert torch.equal(resample_image(image, (5, 6, 7)), image)


def test_constant_image_stays_constant_and_shapes_follow():
    image = torch.full((1, 10, 20, 30), 3.5)
    for axis in (None, 0):
        out = resample_image(image, (7, 33, 15), axis)
        assert out.shape == (1, 7, 33, 15)
        torch.testing.assert_close(out, torch.full_like(out, 3.5))


def test_separate_axis_uses_nearest_along_it():
    image = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous()
    out = resample_image(image, (8, 3, 3), axis=0)
    assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}  # no values between slices


def test_segmentation_keeps_labels_and_small_structures():
    seg = torch.zeros(20, 40, 40, dtype=torch.uint8)
    seg[5:15, 10:30, 10:30] = 1
    seg[8:12, 18:22, 18:22] = 2
    out = resample_segmentation(seg, (10, 20, 20), labels=[0, 1, 2])
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) == {0, 1, 2}
    up = resample_segmentation(seg, (40, 80, 80), labels=[0, 1, 2])
    assert (up == 1).sum().item() == pytest.approx(8 * (seg == 1).sum().item(), rel=0.05)


def test_normalize_ct_clips_then_zscores():
    image = np.array([[[[-1000.0, 80.0, 1000.0]]]], dtype=np.float32)
    out = normalize(image, [ChannelNormalization("ct", -50.0, 150.0, 80.0, 40.0)])
    np.testing.assert_allclose(out[0, 0, 0], [(-50 - 80) / 40, 0.0, (150 - 80) / 40])
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        normalize(image, [ChannelNormalization("minmax")])


def test_cubic_resampling_is_nnunets():
    """order=3 against nnU-Net v2's resample_data_or_seg (tests/data/make_nnunet_resampling_fixture.py):
    full cubic, and in-plane cubic with nearest along a separate axis (up- and downsampling)."""
    fixture = np.load(Path(__file__).parent / "data" / "nnunet_resampling.npz")
    image = torch.from_numpy(fixture["image"])
    for index in range(4):
        shape, axis = tuple(fixture[f"shape{index}"].tolist()), int(fixture[f"axis{index}"])
        out = resample_image(image, shape, None if axis < 0 else axis, order=3)
        assert out.shape == (2, *shape) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), fixture[f"expected{index}"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("new_shape, axis", [((7, 13, 8), None), ((5, 17, 6), 0), ((9, 4, 15), 1), ((5, 9, 22), None)])
def test_cubic_resampling_by_matrices_equals_scipys_zoom(new_shape, axis):
    """The separable matrices give scipy's 3D (or per-slice 2D) order-3 zoom itself, clipped per channel
    (per slice), in float64 on the image's device."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 5, 9, 11))

    def scipy_zoom(volume, shape):
        out = ndimage.zoom(volume, [n / o for n, o in zip(shape, volume.shape)], order=3, mode="nearest",
                           grid_mode=True)
        return np.clip(out, volume.min(), volume.max())

    if axis is None:
        expected = np.stack([scipy_zoom(channel, new_shape) for channel in image])
    else:
        in_plane = [s for i, s in enumerate(new_shape) if i != axis]
        planes = np.stack([np.stack([scipy_zoom(plane, in_plane) for plane in np.moveaxis(channel, axis, 0)])
                           for channel in image])
        nearest = np.floor((np.arange(new_shape[axis]) + 0.5) * image.shape[axis + 1] / new_shape[axis]).astype(int)
        expected = np.moveaxis(planes[:, nearest], 1, axis + 1)
    out = resample_image(torch.from_numpy(image), new_shape, axis, order=3)
    assert out.dtype == torch.float64 and out.device == torch.device("cpu") and out.shape == (2, *new_shape)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-9, rtol=0)


def test_cubic_resampling_is_closer_than_linear_on_a_smooth_image_and_stays_in_range():
    def sampled(n):  # a smooth rising image sampled at voxel centres of an n-voxel grid over [0, 1]
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return torch.sin(torch.pi * (centres - 0.5))[None, :, None, None].expand(1, n, 4, 4).float()

    coarse, fine = sampled(12), sampled(36)
    errors = {order: (resample_image(coarse, (36, 4, 4), order=order) - fine)[:, 3:-3].abs().max()
              for order in (1, 3)}
    assert errors[3] < errors[1] / 3, errors
    spike = torch.zeros(1, 8, 8, 8)
    spike[0, 4, 4, 4] = 1.0
    out = resample_image(spike, (20, 20, 20), order=3)
    assert out.min() >= 0.0 and out.max() <= 1.0  # no spline overshoot past the input's range
    assert torch.equal(resample_image(spike, (8, 8, 8), order=3), spike)
    with pytest.raises(ValueError, match="order"):
        resample_image(spike, (4, 4, 4), order=2)


def test_preprocess_crops_normalises_resamples():
    image, mask = make_case_arrays(np.random.default_rng(0), shape_zyx=(12, 28, 36))
    padded = np.zeros((14, 30, 40), np.float32)  # a zero border is cropped away
    padded[1:13, 1:29, 2:38] = image
    padded_mask = np.zeros((14, 30, 40), np.uint8)
    padded_mask[1:13, 1:29, 2:38] = mask
    loaded = LoadedCase(Case("c", (), None, 0, "train"), padded[None], padded_mask, lps_affine((2.0, 0.8, 0.8)))
    result = preprocess(loaded, small_plan(target_spacing=(4.0, 1.6, 1.6)))
    assert result.bbox == ((1, 13), (1, 29), (2, 38))
    assert result.image.shape == (1, 6, 14, 18) and result.image.dtype == np.float32
    assert result.seg.shape == (6, 14, 18) and set(np.unique(result.seg)) == {0, 1, 2}
    assert result.image.max() <= (150 - 80) / 40 + 1e-5


@pytest.mark.parametrize("order", [1, 3])
def test_preprocess_for_a_device_resamples_there_without_a_round_trip(order):
    """With a device (a GPU prediction), the image goes there once and stays: on the meta device any
    copy back to the CPU would raise. The CPU gives the numpy array, as before."""
    image, mask = make_case_arrays(np.random.default_rng(0), shape_zyx=(12, 28, 36))
    loaded = LoadedCase(Case("c", (), None, 0, "train"), image[None], None, lps_affine((2.0, 0.8, 0.8)))
    plan = small_plan(target_spacing=(4.0, 1.6, 1.6))
    on_meta = preprocess(loaded, plan, image_order=order, device="meta")
    assert isinstance(on_meta.image, torch.Tensor) and on_meta.image.device.type == "meta"
    on_cpu = preprocess(loaded, plan, image_order=order, device="cpu")
    assert isinstance(on_cpu.image, np.ndarray) and on_meta.image.shape == on_cpu.image.shape
    np.testing.assert_array_equal(on_cpu.image, preprocess(loaded, plan, image_order=order).image)


def _z_ramp_case(spacing=(2.0, 0.8, 0.8)) -> LoadedCase:
    """6 x 8 x 8 voxels, HU rising by 20 per slice along z (inside the plan's clip range), pancreas in
    the lower half and lesion in the upper half of the slices."""
    image = (np.arange(6, dtype=np.float32) * 20.0 - 30.0)[:, None, None] * np.ones((1, 8, 8), np.float32)
    mask = np.zeros((6, 8, 8), np.uint8)
    mask[:3, 2:6, 2:6], mask[3:, 2:6, 2:6] = 1, 2
    return LoadedCase(Case("c", (), None, 0, "train"), image[None], mask, lps_affine(spacing))


def _pairs_repeat(volume: np.ndarray) -> bool:
    """Whether slices 2k and 2k + 1 are equal (nearest-neighbour upsampling by 2 along z)."""
    return bool(np.array_equal(volume[..., 0::2, :, :], volume[..., 1::2, :, :]))


def test_plan_threshold_decides_the_separate_axis_in_preprocessing():
    """planning.anisotropy_threshold reaches resampling: 2 mm slices with 0.8 mm pixels (2.5 x) are
    interpolated along z at nnU-Net's threshold 3, and taken nearest-slice at threshold 2."""
    loaded = _z_ramp_case()
    default = preprocess(loaded, small_plan(target_spacing=(1.0, 0.8, 0.8)))
    lower = preprocess(loaded, small_plan(target_spacing=(1.0, 0.8, 0.8), anisotropy_threshold=2.0))
    assert default.image.shape == lower.image.shape == (1, 12, 8, 8)
    assert not _pairs_repeat(default.image) and _pairs_repeat(lower.image)
    assert _pairs_repeat(lower.seg)
    assert (default.anisotropy_threshold, lower.anisotropy_threshold) == (3.0, 2.0)


def test_export_resamples_back_with_the_plans_threshold():
    """The threshold preprocessing used travels with the case to export: z probabilities going back
    from 1 mm to 2 mm slices (2.5 x in the case's grid) are taken nearest-slice at threshold 2 only."""
    ramp = torch.linspace(0.1, 0.9, 12)[:, None, None].expand(12, 4, 4)
    probabilities = torch.stack([1 - ramp, ramp])                       # (K=2, 12, 4, 4) on the plan's grid
    restored = {}
    for threshold in (3.0, 2.0):
        case = PreprocessedCase(image=None, seg=None, bbox=((0, 6), (0, 4), (0, 4)), original_shape=(6, 4, 4),
                                original_spacing=(2.0, 0.8, 0.8), anisotropy_threshold=threshold)
        _, restored[threshold] = restore_original_geometry(probabilities, case, (1.0, 0.8, 0.8), True)
    source_values = np.unique(ramp.numpy().astype(np.float16))
    assert np.isin(restored[2.0][1], source_values).all()                # nearest slice: values kept
    assert not np.isin(restored[3.0][1], source_values).all()            # linear: values between slices


def test_export_asks_the_plans_grid_first_as_nnunet_does():
    """Going back, the plan's grid is the source: with x coarse on the plan's grid and z coarse on the
    case's, nnU-Net treats x separately (nearest along x); asking the case's grid first blended along x."""
    values = torch.tensor([0.2, 0.8])[None, None, :].expand(8, 4, 2)
    probabilities = torch.stack([1 - values, values])                   # (K=2, 8, 4, 2): x is 4 mm
    case = PreprocessedCase(image=None, seg=None, bbox=((0, 2), (0, 4), (0, 8)), original_shape=(2, 4, 8),
                            original_spacing=(4.0, 1.0, 1.0))
    _, restored = restore_original_geometry(probabilities, case, (1.0, 1.0, 4.0), True)
    assert restored.shape == (2, 2, 4, 8)
    np.testing.assert_allclose(restored[1].astype(float), np.broadcast_to(np.repeat([0.2, 0.8], 4), (2, 4, 8)),
                               atol=1e-3)


def test_foreground_locations_cover_each_label():
    seg = np.zeros((10, 10, 10), np.int8)
    seg[2:8, 2:8, 2:8] = 1
    seg[4, 4, 4] = 2
    rows = sample_foreground_locations(seg, np.random.default_rng(0), max_per_label=50)
    assert rows.shape[1] == 4 and rows.dtype == np.int32
    assert (rows[:, 0] == 2).sum() == 1 and (rows[:, 0] == 1).sum() == 50
    assert all(seg[z, y, x] == label for label, z, y, x in rows)
