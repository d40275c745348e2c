"""Image I/O: axis order, affines and spacing survive a round trip; unreadable files are named."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.io import read_volume, spacing_from_affine, strip_suffix, write_nifti
from tests.conftest import SHARED_CT, lps_affine


def test_round_trip_keeps_axis_order_affine_and_dtype(tmp_path):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (Z, Y, X)
    affine = lps_affine((2.0, 0.7, 0.6))
    path = write_nifti(array, affine, tmp_path / "case_0000.nii.gz")
    on_disk = nib.load(str(path))
    assert on_disk.shape == (5, 4, 3)  # NIfTI stores (x, y, z)
    assert on_disk.get_fdata()[4, 3, 2] == array[2, 3, 4]
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, (2.0, 0.7, 0.6), rtol=1e-6)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    write_nifti(np.zeros((3, 3, 3), np.uint8), np.eye(4), tmp_path / "a.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


@pytest.mark.skipif(not (SHARED_CT / "example_ct_sm.nii.gz").exists(), reason="shared CT examples not present")
def test_real_ras_ct_reads_in_zyx_order():
    volume = read_volume(SHARED_CT / "example_ct_sm.nii.gz")
    assert volume.shape == (30, 101, 122)  # file is 122 x 101 x 30 (x, y, z)
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0), atol=1e-4)
    assert np.all(np.diag(volume.affine)[:3] > 0)  # RAS


def test_spacing_from_rotated_affine():
    rotation = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([0.5, 0.7, 3.0])  # columns: x, y, z
    assert spacing_from_affine(affine) == pytest.approx((3.0, 0.7, 0.5))


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "truncated or not an image"),
])
def test_unreadable_files_name_the_file(tmp_path, content, reason):
    path = tmp_path / "bad_0000.nii.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as error:
        read_volume(path)
    assert str(path) in str(error.value)


def test_truncated_nifti_is_reported(tmp_path):
    good = write_nifti(np.ones((20, 30, 40), np.int16), np.eye(4), tmp_path / "good.nii.gz")
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match="truncated"):
        read_volume(truncated)


@pytest.mark.parametrize("shape", [(10, 12), (10, 12, 5, 2)])
def test_2d_and_4d_images_are_rejected(tmp_path, shape):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="expected a 3D image"):
        read_volume(path)


def test_nrrd_and_mha_read_with_ras_affine(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    array = np.random.default_rng(0).integers(-100, 100, (4, 5, 6)).astype(np.int16)  # (Z, Y, X)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.0))  # ITK order (x, y, z)
    image.SetOrigin((1.0, 2.0, 3.0))
    for suffix in (".nrrd", ".mha"):
        path = tmp_path / f"img{suffix}"
        sitk.WriteImage(image, str(path))
        volume = read_volume(path)
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.spacing, (2.0, 0.8, 0.7))
        # ITK's identity direction is LPS; in RAS the x and y axes point the other way.
        np.testing.assert_allclose(volume.affine[:3, 3], (-1.0, -2.0, 3.0))
        np.testing.assert_allclose(np.diag(volume.affine)[:3], (-0.7, -0.8, 2.0))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_volume(path)


def test_strip_suffix():
    assert strip_suffix("a/quiz_0_041_0000.nii.gz") == "quiz_0_041_0000"
    assert strip_suffix("x.nrrd") == "x"
