"""An output folder is never written over where this tool did not write, and never mixes two models."""

from __future__ import annotations

import errno
import json
import os

import pytest

from pancreas_mtl.files import atomic_path
from pancreas_mtl.inference.output_folder import OutputFolderError
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases


@pytest.fixture
def cases(tmp_path):
    folder = tmp_path / "imagesTs"
    return folder, write_cases(folder, count=3)


def _args(checkpoint, folder, out, *more):
    return [f"ckpt={checkpoint}", f"input={folder}", f"output={out}", "inference=fast", *more]


@pytest.mark.parametrize("overwrite", [False, True])
def test_ground_truth_in_the_output_folder_is_never_replaced(tmp_path, cases, overwrite):
    folder, names = cases
    labels = tmp_path / "labelsTr"
    labels.mkdir()
    truth = labels / f"{names[1]}.nii.gz"
    truth.write_bytes((folder / f"{names[1]}.nii.gz").read_bytes())  # the case's reference mask
    before = truth.read_bytes()
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    with pytest.raises(OutputFolderError, match=rf"{labels} holds 1 file\(s\) or folder\(s\) this tool did not "
                                                rf"write: {truth.name}\. predict writes only into an empty"):
        run_predict(_args(checkpoint, folder, labels, f"overwrite={str(overwrite).lower()}"))
    assert truth.read_bytes() == before
    assert sorted(p.name for p in labels.iterdir()) == [truth.name]  # nothing else was written either


def test_tables_this_tool_did_not_write_are_refused_and_unrelated_files_kept(tmp_path, cases):
    folder, names = cases
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    with pytest.raises(OutputFolderError, match="this tool did not write: notes.txt"):  # a folder of the user's
        run_predict(_args(checkpoint, folder, out))
    (out / "notes.txt").unlink()
    run_predict(_args(checkpoint, folder, out))
    (out / "notes.txt").write_text("kept")  # beside this tool's record: left alone
    (out / "subtype_results.csv").unlink()
    (out / "subtype_results.csv").write_text("Names,Subtype\nmine.nii.gz,1\n")  # the user's, no record lists it
    (out / ".records" / ".tables.json").unlink()
    with pytest.raises(OutputFolderError, match="subtype_results.csv"):
        run_predict(_args(checkpoint, folder, out, "overwrite=true"))
    assert (out / "notes.txt").read_text() == "kept"
    assert (out / "subtype_results.csv").read_text() == "Names,Subtype\nmine.nii.gz,1\n"


def test_a_rerun_with_another_model_or_preset_is_refused_until_overwrite_redoes_the_folder(tmp_path, cases):
    folder, names = cases
    first = save_checkpoint(tmp_path / "a.ckpt", tiny_plan(), class_bias=[3.0, 0.0, 0.0])
    second = save_checkpoint(tmp_path / "b.ckpt", tiny_plan(), class_bias=[0.0, 0.0, 3.0])
    out = tmp_path / "pred"
    run_predict(_args(first, folder, out))
    (out / "notes.txt").write_text("kept")

    # a copy of the same checkpoint is the same model: finished cases are skipped
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(first.read_bytes())
    assert sorted(run_predict(_args(copy, folder, out)).skipped) == names

    with pytest.raises(OutputFolderError, match=r"another model, inputs or settings .*\n  networks: "):
        run_predict(_args(second, folder, out))
    with pytest.raises(OutputFolderError, match=r"inference\.mirror_axes: \[0, 1, 2\] vs \[\]"):
        run_predict([*_args(first, folder, out)[:-1], "inference=accurate"])
    with pytest.raises(OutputFolderError, match=r"postprocessing\.largest_lesion: True vs False"):
        run_predict(_args(first, folder, out, "postprocessing.largest_lesion=true"))
    assert (out / "subtype_results.csv").read_text().count(",0\n") == 3  # untouched by the refusals

    # overwrite: the earlier model's predictions go, including a case this run does not predict
    (folder / f"{names[2]}_0000.nii.gz").unlink()
    summary = run_predict(_args(second, folder, out, "overwrite=true"))
    assert sorted(summary.predicted) == names[:2]
    assert (out / "subtype_results.csv").read_text() == "Names,Subtype\n" + "".join(
        f"{name}.nii.gz,2\n" for name in names[:2])
    assert not (out / f"{names[2]}.nii.gz").exists() and (out / "notes.txt").read_text() == "kept"


def test_a_folder_that_refuses_writes_is_named_with_the_cause(tmp_path, cases, monkeypatch):
    folder, _ = cases
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    out = tmp_path / "pred"
    run_predict(_args(checkpoint, folder, out))

    def read_only(*_, **__):  # what a read-only mount or folder answers (root ignores chmod, so it is simulated)
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    with pytest.raises(OutputFolderError, match=rf"output folder {out} is not writable: Read-only file system"):
        run_predict(_args(checkpoint, folder, out))


def test_atomic_write_raises_the_write_error_not_the_clean_up_error(tmp_path, monkeypatch):
    def refused(*_, **__):
        raise PermissionError(errno.EACCES, "clean-up refused")

    monkeypatch.setattr("pathlib.Path.unlink", refused)
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "file.txt"):
            raise ZeroDivisionError


def test_a_record_listing_other_files_never_gets_them_removed(tmp_path, cases):
    folder, names = cases
    first = save_checkpoint(tmp_path / "a.ckpt", tiny_plan(), class_bias=[3.0, 0.0, 0.0])
    second = save_checkpoint(tmp_path / "b.ckpt", tiny_plan(), class_bias=[0.0, 0.0, 3.0])
    out = tmp_path / "pred"
    run_predict(_args(first, folder, out))
    (out / "notes.txt").write_text("kept")
    record = out / ".records" / f"{names[0]}.json"
    edited = json.loads(record.read_text())
    edited["files"] = [f"{names[0]}.nii.gz", "notes.txt", "../a.ckpt"]
    record.write_text(json.dumps(edited))
    run_predict(_args(second, folder, out, "overwrite=true"))  # removes the earlier model's files
    assert (out / "notes.txt").read_text() == "kept" and first.is_file()
