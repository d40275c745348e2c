"""The output-folder guard (pancreas_mtl/output_guard.py): every command that writes refuses a folder of the
user's, a folder it reads, and a dataset's folder, and replaces only the files its record lists unchanged."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pancreas_mtl.commands.cli import main
from pancreas_mtl.output_guard import OutputFolder, OutputFolderError
from pancreas_mtl.synthetic.dataset_folder import generate_dataset
from pancreas_mtl.synthetic.generator import load_config
from tests import notebook_inputs
from tests.conftest import REPO_ROOT
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny dataset, predictions of its validation split, and a sweep with a cross-validation summary."""
    root = tmp_path_factory.mktemp("guard")
    dataset = notebook_inputs.tiny_dataset(root / "data")
    pred = notebook_inputs.predictions(dataset, root / "pred")
    sweep = notebook_inputs.multirun(root / "sweep", seeds=(1,), experiments=("seed=1",))
    notebook_inputs.crossval_summary(sweep, dataset, 0.6)
    (sweep / "0" / ".hydra" / "config.yaml").write_text("{}\n")  # a job folder, as job_dirs finds one
    return dataset, pred, sweep


def _evaluate(pred, gt, out, *more):
    return main(["evaluate", f"pred={pred}", f"gt={gt}", f"out={out}", "splits=[validation]", "bootstrap=5",
                 "plots=false", "progress=false", *more])


def test_evaluate_into_the_ground_truth_or_the_predictions_writes_nothing(scored, capsys):
    dataset, pred, _ = scored
    before = snapshot(dataset), snapshot(pred)
    assert _evaluate(pred, dataset, dataset) == 1
    assert f"output folder {dataset} is {dataset}, which this run reads" in capsys.readouterr().err
    assert _evaluate(pred, dataset, dataset / "validation") == 1
    assert "is a dataset's folder (a dataset's split folder, holding subtype folders)" in capsys.readouterr().err
    assert _evaluate(pred, dataset, pred) == 1
    assert f"output folder {pred} is {pred}, which this run reads" in capsys.readouterr().err
    assert (snapshot(dataset), snapshot(pred)) == before


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_a_users_results_in_the_named_folder_are_never_replaced(scored, tmp_path, capsys, command):
    dataset, pred, sweep = scored
    out = tmp_path / "mine"
    out.mkdir()
    own = {"evaluate": "summary.json", "compare": "compare.csv"}[command]
    (out / own).write_text("my own results")
    args = (["evaluate", f"pred={pred}", f"gt={dataset}", f"out={out}", "splits=[validation]", "plots=false"]
            if command == "evaluate" else ["compare", f"runs=[{sweep}]", f"out={out}"])
    assert main([*args, "progress=false"]) == 1
    assert main([*args, "progress=false", "overwrite=true"]) == 1  # overwrite removes recorded files only
    assert f"holds 1 file(s) or folder(s) this tool did not write: {own}" in capsys.readouterr().err
    assert snapshot(out) == {own: b"my own results"}


def test_holdout_refuses_a_folder_of_the_users(scored, tmp_path, capsys):
    _, _, sweep = scored
    out = tmp_path / "scores"
    out.mkdir()
    (out / "holdout.json").write_text("{}")
    assert main(["holdout", f"multirun={sweep}", f"out={out}", "progress=false"]) == 1
    assert "this tool did not write: holdout.json" in capsys.readouterr().err
    assert snapshot(out) == {"holdout.json": b"{}"}


def test_a_rerun_replaces_its_own_files_and_keeps_one_changed_by_hand(scored, tmp_path, caplog):
    dataset, pred, _ = scored
    out = tmp_path / "eval"
    assert _evaluate(pred, dataset, out) == 0
    per_case = (out / "per_case.csv").read_bytes()
    assert _evaluate(pred, dataset, out, "bootstrap=7") == 0  # the same evaluation: its own files replaced
    (out / "summary.json").write_text('{"edited": true}')
    with caplog.at_level(logging.WARNING):
        assert _evaluate(pred, dataset, out) == 0
    assert (out / "summary.json").read_text() == '{"edited": true}'
    assert any(f"{out / 'summary.json'} was changed after evaluate wrote it" in r.getMessage() for r in caplog.records)
    assert (out / "per_case.csv").read_bytes() == per_case
    # another evaluation: refused; with overwrite its recorded files go, the edited one stays
    assert _evaluate(pred, dataset, out, "tolerance_mm=1") == 1
    assert _evaluate(pred, dataset, out, "tolerance_mm=1", "overwrite=true") == 0
    assert (out / "summary.json").read_text() == '{"edited": true}'


def test_predict_keeps_a_mask_corrected_by_hand_and_redoes_the_others(tmp_path, caplog):
    folder = tmp_path / "imagesTs"
    names = write_cases(folder, count=3)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    out = tmp_path / "pred"
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={out}", "inference=fast"]
    run_predict(args)
    corrected = out / f"{names[0]}.nii.gz"
    corrected.write_bytes((folder / f"{names[1]}_0000.nii.gz").read_bytes())  # any other content
    edited = corrected.read_bytes()
    with caplog.at_level(logging.WARNING):
        summary = run_predict([*args, "overwrite=true"])
    assert corrected.read_bytes() == edited
    assert sorted(summary.predicted) == names[1:] and summary.kept == [corrected.name]
    assert any(f"{corrected} was changed after predict wrote it" in r.getMessage() for r in caplog.records)
    assert run_predict([*args, "overwrite=true"]).kept == [corrected.name]  # still the user's


@pytest.mark.parametrize("where", ["subtype folder", "beside the images", "holding the inputs"])
def test_predict_never_writes_into_a_dataset_or_its_inputs(tmp_path, where):
    dataset = notebook_inputs.tiny_dataset(tmp_path / "data")
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    inputs = dataset / "validation" / "subtype0"
    output = {"subtype folder": dataset / "validation" / "subtype9", "beside the images": inputs,
              "holding the inputs": dataset}[where]
    before = snapshot(dataset)
    with pytest.raises(OutputFolderError, match="a dataset's folder|which this run reads"):
        run_predict([f"ckpt={checkpoint}", f"input={inputs}", f"output={output}", "inference=fast"])
    assert snapshot(dataset) == before and not (dataset / "validation" / "subtype9").exists()


def test_the_guard_removes_only_recorded_unchanged_files(tmp_path, caplog):
    out = tmp_path / "out"
    folder = OutputFolder.open(out, "evaluate", identity={"a": 1}, writes=["x.csv", "y.csv"])
    for name in ("x.csv", "y.csv"):
        (out / name).write_text(name)
    folder.record(".evaluate", ["x.csv", "y.csv"])
    (out / "notes.txt").write_text("mine")
    (out / "y.csv").write_text("edited")
    with pytest.raises(OutputFolderError, match=r"another model, inputs or settings .*\n  a: 2 vs 1"):
        OutputFolder.open(out, "evaluate", identity={"a": 2}, writes=["x.csv"])
    with pytest.raises(OutputFolderError, match="holds the outputs of evaluate; write the outputs of compare"):
        OutputFolder.open(out, "compare", writes=["x.csv"])
    with caplog.at_level(logging.WARNING):
        reopened = OutputFolder.open(out, "evaluate", identity={"a": 2}, writes=["x.csv", "y.csv"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".records", "notes.txt", "y.csv"]
    assert not reopened.may_write("y.csv") and reopened.may_write("x.csv")
    assert (out / "y.csv").read_text() == "edited"
    # a record naming a file of the user's without a digest claims nothing
    folder.record(".evaluate", [], pending=["notes.txt"])
    assert "notes.txt" not in reopened.owned()
    with pytest.raises(OutputFolderError, match="this tool did not write: .*notes.txt"):
        OutputFolder.open(out, "evaluate", identity={"a": 2}, writes=["notes.txt"], overwrite=True)


def test_generate_refuses_to_replace_a_file_changed_by_hand(tmp_path):
    config = load_config("tiny")
    import dataclasses

    config = dataclasses.replace(config, name="mini", train_counts=(1, 0, 0), validation_counts=(0, 0, 0),
                                 test_counts=(1, 0, 0))
    root = generate_dataset(tmp_path / "synth", config, progress=False)
    mask = next(p for p in root.rglob("*.nii.gz") if not p.name.endswith("_0000.nii.gz") and "test" not in p.parts)
    mask.write_bytes(mask.read_bytes() + b"")  # unchanged: replaced freely
    generate_dataset(root, dataclasses.replace(config, seed=9), overwrite=True, progress=False)
    mask = next(p for p in root.rglob("*.nii.gz") if not p.name.endswith("_0000.nii.gz") and "test" not in p.parts)
    mask.write_bytes(b"corrected by hand")
    with pytest.raises(FileExistsError, match=f"{mask.relative_to(root).as_posix()} changed after the generator"):
        generate_dataset(root, dataclasses.replace(config, seed=10), overwrite=True, progress=False)
    assert mask.read_bytes() == b"corrected by hand"


def test_make_notebooks_never_writes_into_notebooks(tmp_path):
    before = snapshot(REPO_ROOT / "notebooks")
    for out in (REPO_ROOT / "notebooks", REPO_ROOT / "notebooks" / "run"):
        result = subprocess.run([sys.executable, "scripts/run_notebooks.py", "--out", str(out), "--eval",
                                 str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 1 and "holds the committed notebooks" in result.stderr, result.stderr
    assert snapshot(REPO_ROOT / "notebooks") == before and not (REPO_ROOT / "notebooks" / "run").exists()


def test_a_full_disk_at_the_table_write_is_listed_in_the_summary_not_a_traceback(tmp_path, monkeypatch):
    import errno
    import os

    from pancreas_mtl.inference import runner

    folder = tmp_path / "imagesTs"
    names = write_cases(folder, count=2)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())

    def full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "write_csv", full)
    out = tmp_path / "pred"
    summary = run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={out}", "inference=fast"])
    assert sorted(summary.predicted) == names and summary.exit_code == 1
    assert "No space left on device" in summary.failed["(tables)"]
    assert all((out / f"{name}.nii.gz").is_file() for name in names)
