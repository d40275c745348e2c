"""Discovery of both layouts, the converter between them, and structural problems reported together."""

import json

import numpy as np
import pytest

from pancreas_mtl.raw.convert import convert_to_nnunet
from pancreas_mtl.raw.errors import DatasetError
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.raw.layout import discover
from tests.conftest import lps_affine, make_case_arrays


def test_distributed_layout(distributed_dataset):
    index = discover(distributed_dataset)
    assert index.layout == "distributed"
    assert len(index.split("train")) == 6 and len(index.split("validation")) == 3 and len(index.split("test")) == 2
    assert {case.subtype for case in index.split("train")} == {0, 1, 2}
    case = next(c for c in index.cases if c.case_id == "quiz_1_003")
    assert case.subtype == 1 and case.label_path.name == "quiz_1_003.nii.gz"
    assert [p.name for p in case.image_paths] == ["quiz_1_003_0000.nii.gz"]
    assert all(c.label_path is None and c.subtype is None for c in index.split("test"))


def test_converter_round_trip(distributed_dataset, tmp_path):
    converted = convert_to_nnunet(distributed_dataset, tmp_path / "Dataset501")
    original = discover(distributed_dataset)
    assert converted.layout == "nnunet"
    description = json.loads((tmp_path / "Dataset501" / "dataset.json").read_text())
    assert description["numTraining"] == 9 and description["file_ending"] == ".nii.gz"
    assert description["labels"] == {"background": 0, "pancreas": 1, "lesion": 2}
    assert {c.case_id: c.subtype for c in converted.labelled} == {c.case_id: c.subtype for c in original.labelled}
    assert {c.case_id for c in converted.split("test")} == {c.case_id for c in original.split("test")}
    assert converted.splits[0]["val"] == sorted(c.case_id for c in original.split("validation"))
    with pytest.raises(FileExistsError):
        convert_to_nnunet(distributed_dataset, tmp_path / "Dataset501")


def test_nnunet_multichannel(tmp_path):
    root = tmp_path / "Dataset502"
    rng = np.random.default_rng(0)
    for case_id in ("a", "b"):
        image, mask = make_case_arrays(rng)
        for channel in range(2):
            write_nifti(image, lps_affine(), root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz")
        write_nifti(mask, lps_affine(), root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "CT_late"}, "numTraining": 2,
                                                   "labels": {"background": 0, "pancreas": 1, "lesion": 2},
                                                   "file_ending": ".nii.gz"}))
    (root / "subtype_mapping.json").write_text(json.dumps({"a": 0, "b": 2}))
    index = discover(root)
    assert [len(c.image_paths) for c in index.cases] == [2, 2]
    assert [c.subtype for c in index.cases] == [0, 2]


def _problems(root):
    with pytest.raises(DatasetError) as error:
        discover(root)
    return error.value.problems, str(error.value)


def test_every_structural_problem_is_reported_at_once(distributed_dataset):
    (distributed_dataset / "train" / "subtype0" / "quiz_0_001.nii.gz").unlink()  # mask missing
    (distributed_dataset / "train" / "subtype1" / "quiz_1_003_0000.nii.gz").rename(
        distributed_dataset / "train" / "subtype1" / "quiz_1_003_0001.nii.gz")  # channel 0 missing
    (distributed_dataset / "train" / "subtype7").mkdir()
    problems, message = _problems(distributed_dataset)
    assert len(problems) >= 3
    assert "quiz_0_001" in message and "mask file missing" in message
    assert "quiz_1_003" in message and "channel 0 file missing" in message
    assert "subtype 7 outside" in message


def _write_nnunet(root, description, mapping=None, cases=("a", "b")):
    rng = np.random.default_rng(0)
    for case_id in cases:
        image, mask = make_case_arrays(rng)
        write_nifti(image, lps_affine(), root / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_nifti(mask, lps_affine(), root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(description))
    if mapping is not None:
        (root / "subtype_mapping.json").write_text(json.dumps(mapping))
    return root


GOOD_DESCRIPTION = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1, "lesion": 2},
                    "numTraining": 2, "file_ending": ".nii.gz"}


def test_dataset_json_missing_fields(tmp_path):
    root = _write_nnunet(tmp_path / "d", {"channel_names": {"0": "CT"}})
    problems, message = _problems(root)
    assert "missing field(s): labels, numTraining, file_ending" in message


def test_dataset_json_declares_channel_without_files(tmp_path):
    root = _write_nnunet(tmp_path / "d", {**GOOD_DESCRIPTION, "channel_names": {"0": "CT", "1": "PET"}})
    problems, message = _problems(root)
    assert "channel 1 file missing" in message and "a_0001.nii.gz" in message and "b_0001.nii.gz" in message


@pytest.mark.parametrize("mapping, expected", [
    ({"a": 0}, "case b: "),
    ({"a": 0}, "case missing from the subtype mapping"),
    ({"a": 0, "b": 1, "zz": 2}, "case zz: "),
    ({"a": 0, "b": 1, "zz": 2}, "subtype mapping names a case that is not in imagesTr"),
    ({"a": 0, "b": 5}, "subtype must be an integer in 0..2, found 5"),
    ({"a": 0, "b": "x"}, "found 'x'"),
])
def test_subtype_mapping_problems(tmp_path, mapping, expected):
    root = _write_nnunet(tmp_path / "d", GOOD_DESCRIPTION, mapping)
    problems, message = _problems(root)
    assert expected in message


def test_numtraining_mismatch_and_orphan_mask(tmp_path):
    root = _write_nnunet(tmp_path / "d", {**GOOD_DESCRIPTION, "numTraining": 5})
    (root / "imagesTr" / "b_0000.nii.gz").unlink()
    problems, message = _problems(root)
    assert "numTraining is 5 but imagesTr holds 1" in message
    assert "mask without an image" in message


def test_not_a_dataset(tmp_path):
    problems, message = _problems(tmp_path)
    assert "not a dataset" in message
