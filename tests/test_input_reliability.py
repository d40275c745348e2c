"""Input files named, laid out or typed wrongly are reported by name: nameless and unnumbered images,
nnU-Net folders without dataset.json, complex or boolean voxels, a case in two splits."""

from __future__ import annotations

import json
import shutil
import struct

import nibabel as nib
import numpy as np
import pytest

from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.errors import DataError, DatasetError
from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.raw.layout import Case, discover
from pancreas_mtl.inference.sources import find_cases
from tests.conftest import lps_affine, make_case_arrays
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases


def _discovery_problems(root) -> str:
    with pytest.raises(DatasetError) as error:
        discover(root)
    return str(error.value)


# --- prediction inputs: every image file is a case, a mask beside its image, or a problem by name ----------

def test_a_nameless_channel_file_is_a_failed_case_by_name(tmp_path):
    folder = tmp_path / "in"
    names = write_cases(folder, count=1)
    shutil.copy(folder / f"{names[0]}_0000.nii.gz", folder / "_0000.nii.gz")
    cases, problems = find_cases(folder)
    assert [case.case_id for case in cases] == names
    assert list(problems) == ["_0000"] and "_0000.nii.gz" in problems["_0000"]
    assert "no case id before the channel number" in problems["_0000"]
    # named on its own, or in a folder of unnumbered images, it is no case "_0000" either
    assert list(find_cases(folder / "_0000.nii.gz")[1]) == ["_0000"]
    (folder / f"{names[0]}_0000.nii.gz").rename(folder / "plain.nii.gz")
    (folder / f"{names[0]}.nii.gz").unlink()
    cases, problems = find_cases(folder)
    assert [case.case_id for case in cases] == ["plain"] and list(problems) == ["_0000"]


def test_an_unnumbered_image_beside_numbered_ones_is_a_failed_case_by_name(tmp_path):
    folder = tmp_path / "in"
    names = write_cases(folder, count=2)  # quiz_001.nii.gz beside quiz_001_0000.nii.gz: a mask, ignored
    shutil.copy(folder / f"{names[0]}_0000.nii.gz", folder / "quiz_077.nii.gz")
    cases, problems = find_cases(folder)
    assert [case.case_id for case in cases] == names
    assert list(problems) == ["quiz_077"]
    assert "quiz_077.nii.gz" in problems["quiz_077"] and "no channel number" in problems["quiz_077"]
    assert "quiz_077_0000.nii.gz" in problems["quiz_077"]

    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    summary = run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}"])
    assert summary.exit_code == 1 and list(summary.failed) == ["quiz_077"] and summary.predicted == names


def test_an_nnunet_folder_without_dataset_json_says_what_it_expected(tmp_path):
    root = tmp_path / "Dataset501"
    write_cases(root / "imagesTs", count=1)
    (root / "imagesTr").mkdir()
    with pytest.raises(DatasetError) as error:
        find_cases(root)
    message = str(error.value)
    assert str(root) in message and "imagesTr/, imagesTs/" in message and "no dataset.json" in message
    assert "channel_names, labels, numTraining, file_ending" in message
    assert "imagesTr/, imagesTs/ but no dataset.json" in _discovery_problems(root)  # as pancreas-mtl check says
    # one of its folders is still a folder of images
    assert [case.case_id for case in find_cases(root / "imagesTs")[0]] == ["quiz_001"]


# --- dataset discovery -------------------------------------------------------------------------------------

def test_discovery_names_a_nameless_channel_file(distributed_dataset, tmp_path):
    subtype0 = distributed_dataset / "train" / "subtype0"
    shutil.copy(subtype0 / "quiz_0_001_0000.nii.gz", subtype0 / "_0000.nii.gz")
    message = _discovery_problems(distributed_dataset)
    assert "_0000.nii.gz: no case id before the channel number" in message
    assert "mask without an image" not in message

    root = tmp_path / "nnunet"
    rng = np.random.default_rng(0)
    image, mask = make_case_arrays(rng)
    write_nifti(image, lps_affine(), root / "imagesTr" / "a_0000.nii.gz")
    write_nifti(image, lps_affine(), root / "imagesTr" / "_0000.nii.gz")
    write_nifti(mask, lps_affine(), root / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1,
                                                   "labels": {"background": 0, "pancreas": 1, "lesion": 2},
                                                   "file_ending": ".nii.gz"}))
    assert "_0000.nii.gz: no case id before the channel number" in _discovery_problems(root)


@pytest.mark.parametrize("copy_to", ["validation/subtype0", "train/subtype1"])
def test_a_case_in_two_places_is_reported_once_without_a_false_orphan_mask(distributed_dataset, copy_to):
    source = distributed_dataset / "train" / "subtype0"
    for name in ("quiz_0_001_0000.nii.gz", "quiz_0_001.nii.gz"):
        shutil.copy(source / name, distributed_dataset / copy_to / name)
    with pytest.raises(DatasetError) as error:
        discover(distributed_dataset)
    assert len(error.value.problems) == 1
    assert "case quiz_0_001" in str(error.value) and "case also present in" in str(error.value)
    assert "mask without an image" not in str(error.value)


# --- voxel types -------------------------------------------------------------------------------------------

def _nifti(path, array):
    image = nib.Nifti1Image(array, np.eye(4))
    nib.save(image, str(path))
    return path


def _binary_nifti(path):
    """A NIfTI of datatype 1 (DT_BINARY, one bit per voxel): the format's boolean image."""
    _nifti(path, np.zeros((4, 4, 4), np.uint8))
    header = bytearray(path.read_bytes())
    header[70:74] = struct.pack("<hh", 1, 1)  # datatype, bitpix
    path.write_bytes(bytes(header))
    return path


def _rgb(shape=(4, 4, 4)):
    return np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])


@pytest.mark.parametrize(("write", "found"), [
    (lambda p: _nifti(p / "a_0000.nii.gz", np.ones((4, 4, 4), np.complex64)), "complex64"),
    (lambda p: _nifti(p / "a_0000.nii.gz", np.ones((4, 4, 4), np.complex128)), "complex128"),
    (lambda p: _nifti(p / "a_0000.nii", _rgb()), "R/G/B (a colour image)"),
    (lambda p: _binary_nifti(p / "a_0000.nii"), "binary"),
])
def test_complex_boolean_and_rgb_nifti_voxels_are_refused_by_name(tmp_path, write, found):
    path = write(tmp_path)
    with pytest.raises(DataError) as error:
        read_volume(path)
    message = str(error.value)
    assert str(path) in message and found in message and "expected real integer or floating voxels" in message


def test_complex_nrrd_voxels_are_refused_by_name(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    path = tmp_path / "a_0000.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), str(path))
    with pytest.raises(DataError, match=r"complex64.*expected real integer or floating voxels") as error:
        read_volume(path)
    assert str(path) in str(error.value)


def test_a_complex_mask_is_refused_naming_the_case_and_the_mask(tmp_path):
    image, mask = make_case_arrays(np.random.default_rng(0))
    image_path = write_nifti(image, lps_affine(), tmp_path / "a_0000.nii.gz")
    mask_path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.complex64), lps_affine()), str(mask_path))
    with pytest.raises(DataError) as error:
        load_case(Case("a", (image_path,), mask_path, 0, "train"))
    assert str(error.value).startswith(f"case a: {mask_path}") and "complex64" in str(error.value)
