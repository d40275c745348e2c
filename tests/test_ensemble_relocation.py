"""The fold ensemble of pancreas-mtl crossval (ensemble.yaml) when its sweep is copied, moved or tampered
with: members are found relative to the file and checked against their SHA-256 and shared plan."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pancreas_mtl.commands.cli import main
from pancreas_mtl.inference.checkpoint import expand_checkpoints
from tests.conftest import write_distributed_dataset
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases
from tests.test_crossval import QUIET, make_sweep

MEMBERS = [f"{fold}/checkpoints/last.ckpt" for fold in (0, 1)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A cross-validated two-fold sweep; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("relocation")
    dataset = write_distributed_dataset(root / "quiz")
    folder = make_sweep(root / "sweep", dataset)
    assert main(["crossval", f"multirun={folder}", "device=cpu", *QUIET]) == 0
    return folder


@pytest.fixture
def copied(sweep, tmp_path) -> Path:
    return Path(shutil.copytree(sweep, tmp_path / "copy", symlinks=True))


def unrelated_model(path: Path, **plan_changes) -> Path:
    """Overwrite ``path`` with another network (other weights, optionally another plan)."""
    return save_checkpoint(path, tiny_plan(**plan_changes), seed=99, seg_bias=[4.0, 0.0, 0.0],
                           class_bias=[0.0, 0.0, 3.0])


def test_the_ensemble_lists_members_relative_to_itself_with_digests_and_folds(copied):
    ensemble = copied / "crossval" / "ensemble.yaml"
    content = yaml.safe_load(ensemble.read_text())
    assert content["format"] == "pancreas_mtl.ensemble/2" and len(content["plan_sha256"]) == 64
    assert [member["checkpoint"] for member in content["members"]] == [f"../{name}" for name in MEMBERS]
    assert [member["fold"] for member in content["members"]] == [0, 1]
    for member, name in zip(content["members"], MEMBERS):
        assert member["sha256"] == hashlib.sha256((copied / name).read_bytes()).hexdigest()


def test_a_copied_sweep_predicts_from_its_own_files(sweep, tmp_path):
    original = tmp_path / "original"  # a copy of the sweep stands in for the original, which others share
    shutil.copytree(sweep, original, symlinks=True)
    moved = tmp_path / "moved"
    shutil.copytree(original, moved, symlinks=True)
    unrelated_model(original / MEMBERS[1])  # swapped in the original after the copy
    expected = [str(moved / name) for name in MEMBERS]
    assert expand_checkpoints([moved / "crossval"]) == expected
    assert expand_checkpoints([moved / "crossval" / "ensemble.yaml"]) == expected
    names = write_cases(tmp_path / "images", count=1)
    summary = run_predict([f"ckpt={moved / 'crossval'}", f"input={tmp_path / 'images'}", f"output={tmp_path / 'a'}"])
    assert summary.predicted == names
    record = json.loads((tmp_path / "a" / ".records" / f"{names[0]}.json").read_text())
    assert record["checkpoints"] == expected
    shutil.rmtree(original)  # the original gone: the copy still predicts, with the same networks
    summary = run_predict([f"ckpt={moved / 'crossval' / 'ensemble.yaml'}", f"input={tmp_path / 'images'}",
                           f"output={tmp_path / 'b'}"])
    assert summary.predicted == names
    first, second = (json.loads((tmp_path / out / ".records" / ".run.json").read_text()) for out in ("a", "b"))
    assert first["identity"]["networks"] == second["identity"]["networks"]


def test_a_swapped_member_is_an_error_naming_the_file(copied, tmp_path):
    unrelated_model(copied / MEMBERS[1])
    with pytest.raises(ValueError, match=r"last\.ckpt: its SHA-256 differs") as error:
        expand_checkpoints([copied / "crossval"])
    assert str(copied / MEMBERS[1]) in str(error.value) and "ensemble.yaml" in str(error.value)
    write_cases(tmp_path / "images", count=1)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        run_predict([f"ckpt={copied / 'crossval'}", f"input={tmp_path / 'images'}", f"output={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_a_missing_member_is_an_error_naming_the_file(copied):
    (copied / MEMBERS[0]).unlink()
    with pytest.raises(ValueError, match="not found") as error:
        expand_checkpoints([copied / "crossval"])
    assert str(copied / MEMBERS[0]) in str(error.value) and str(copied / "crossval" / "ensemble.yaml") in str(error.value)


def test_a_member_of_another_plan_is_refused_even_with_its_digest_updated(copied):
    ensemble = copied / "crossval" / "ensemble.yaml"
    unrelated_model(copied / MEMBERS[1], patch=(8, 8, 8))
    content = yaml.safe_load(ensemble.read_text())
    content["members"][1]["sha256"] = hashlib.sha256((copied / MEMBERS[1]).read_bytes()).hexdigest()
    ensemble.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="plan differs from the ensemble's plan_sha256") as error:
        expand_checkpoints([ensemble])
    assert str(copied / MEMBERS[1]) in str(error.value)


def test_an_ensemble_with_a_python_tag_is_refused_unrun(tmp_path):
    ensemble = tmp_path / "ensemble.yaml"
    marker = tmp_path / "ran"
    ensemble.write_text(f"format: pancreas_mtl.ensemble/2\nmembers: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="python tag") as error:
        expand_checkpoints([tmp_path])
    assert str(ensemble) in str(error.value)
    assert not marker.exists()


def test_an_ensemble_of_the_old_format_asks_to_rerun_crossval(tmp_path):
    (tmp_path / "ensemble.yaml").write_text("checkpoints: [/elsewhere/0/checkpoints/last.ckpt]\nfolds: [0]\n")
    with pytest.raises(ValueError, match="rerun pancreas-mtl crossval") as error:
        expand_checkpoints([tmp_path / "ensemble.yaml"])
    assert str(tmp_path / "ensemble.yaml") in str(error.value)
