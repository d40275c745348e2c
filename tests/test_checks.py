"""Content checks: label hygiene, geometry mismatches, non-finite voxels; a dataset check lists all problems."""

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.errors import DataError, DatasetError
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.raw.layout import Case, discover
from pancreas_mtl.planning.fingerprint import compute_fingerprint
from tests.conftest import lps_affine, make_case_arrays


def _case(tmp_path, image=None, mask=None, image_affine=None, mask_affine=None, name="c"):
    rng = np.random.default_rng(0)
    default_image, default_mask = make_case_arrays(rng)
    image = default_image if image is None else image
    mask = default_mask if mask is None else mask
    image_path = write_nifti(image, lps_affine() if image_affine is None else image_affine, tmp_path / f"{name}_0000.nii.gz")
    mask_path = write_nifti(mask, lps_affine() if mask_affine is None else mask_affine, tmp_path / f"{name}.nii.gz")
    return Case(name, (image_path,), mask_path, 0, "train")


def test_float_labels_are_rounded(tmp_path):
    _, mask = make_case_arrays(np.random.default_rng(0))
    float_mask = mask.astype(np.float32)
    float_mask[mask == 1] = 1.0000153
    loaded = load_case(_case(tmp_path, mask=float_mask))
    assert loaded.seg.dtype == np.uint8
    np.testing.assert_array_equal(loaded.seg, mask)


def test_loaded_case_is_channel_first_float(tmp_path):
    loaded = load_case(_case(tmp_path))
    assert loaded.image.shape == (1, 12, 28, 36) and loaded.image.dtype == np.float32
    assert loaded.spacing == pytest.approx((2.0, 0.8, 0.8))


@pytest.mark.parametrize("mutate, message", [
    (lambda img, msk: (img, np.where(msk == 2, 3, msk).astype(np.uint8)), r"labels must be in \[0, 1, 2\], found \[3\]"),
    (lambda img, msk: (img, msk.astype(np.float32) * 1.4), "values must be integers"),
    (lambda img, msk: (img.astype(np.float32) * np.where(msk == 2, np.nan, 1), msk), "NaN or infinite"),
    (lambda img, msk: (img.astype(np.float32) * np.where(msk == 2, np.inf, 1), msk), "NaN or infinite"),
    (lambda img, msk: (img, msk[:, :, :-1]), "mask shape"),
    (lambda img, msk: (img[:2], msk[:2]), "at least 3 voxels"),
])
def test_bad_content_names_case_file_and_reason(tmp_path, mutate, message):
    image, mask = mutate(*make_case_arrays(np.random.default_rng(0)))
    case = _case(tmp_path, image=image, mask=mask)
    with pytest.raises(DataError, match=message) as error:
        load_case(case)
    assert "case c" in str(error.value) and "c_0000.nii.gz" in str(error.value) or "c.nii.gz" in str(error.value)


def test_mask_affine_mismatch(tmp_path):
    case = _case(tmp_path, mask_affine=lps_affine(origin=(0.0, 0.0, 30.0)))
    with pytest.raises(DataError, match="mask affine differs") as error:
        load_case(case)
    assert error.value.path.name == "c.nii.gz"


def test_sheared_affine_and_zero_spacing(tmp_path):
    sheared = lps_affine()
    sheared[0, 1] = 0.4
    with pytest.raises(DataError, match="sheared"):
        load_case(_case(tmp_path, image_affine=sheared, mask_affine=sheared))


def test_zero_spacing_in_header(tmp_path):
    image, mask = make_case_arrays(np.random.default_rng(0))
    paths = []
    for array, name in ((image, "z_0000.nii.gz"), (mask, "z.nii.gz")):
        nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), None), str(tmp_path / "plain.nii"))
        header = bytearray((tmp_path / "plain.nii").read_bytes())
        header[84:88] = struct.pack("<f", 0.0)  # pixdim[3], the z spacing; nibabel refuses to write it
        (tmp_path / name).write_bytes(gzip.compress(bytes(header)))
        paths.append(tmp_path / name)
    with pytest.raises(DataError, match=r"spacing \(pixdim, x y z\) must be positive") as error:
        load_case(Case("z", (paths[0],), paths[1], 0, "train"))
    assert "case z" in str(error.value) and "z_0000.nii.gz" in str(error.value)


def test_dataset_check_reports_every_bad_case(distributed_dataset):
    train = distributed_dataset / "train"
    (train / "subtype0" / "quiz_0_001_0000.nii.gz").write_bytes(b"garbage")
    _, mask = make_case_arrays(np.random.default_rng(0))
    write_nifti(np.where(mask == 2, 9, mask).astype(np.uint8), lps_affine(), train / "subtype1" / "quiz_1_003.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((36, 28), np.int16), np.eye(4)), str(train / "subtype2" / "quiz_2_005_0000.nii.gz"))
    with pytest.raises(DatasetError) as error:
        compute_fingerprint(discover(distributed_dataset), progress=False)
    message = str(error.value)
    assert len(error.value.problems) == 3, message
    assert "quiz_0_001" in message and "truncated or not an image" in message
    assert "quiz_1_003" in message and "found [9]" in message
    assert "quiz_2_005" in message and "expected a 3D image, found 2D" in message


def test_mask_without_foreground_is_a_problem(distributed_dataset):
    write_nifti(np.zeros((12, 28, 36), np.uint8), lps_affine(), distributed_dataset / "train" / "subtype0" / "quiz_0_001.nii.gz")
    with pytest.raises(DatasetError, match="quiz_0_001.*no foreground"):
        compute_fingerprint(discover(distributed_dataset), progress=False)
