"""Dataset tools never destroy or mix in data they did not write: the generator, the converter and
the choice between a folder of one's own and the built-in synthetic set (``data.source``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from pancreas_mtl.commands.cli import main as cli_main
from pancreas_mtl.raw.convert import convert_to_nnunet
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.dataset.prepare import dataset_root, prepare_dataset
from pancreas_mtl.synthetic import dataset_folder
from pancreas_mtl.synthetic.dataset_folder import GENERATOR_VERSION, MARKER_FILE, generate_dataset, plan_cases
from pancreas_mtl.synthetic.generator import load_config
from tests.conftest import REPO_ROOT, write_distributed_dataset

EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what must survive a refused command."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mini():
    """Three training cases and one test case of the tiny preset: about a second to generate."""
    return dataclasses.replace(load_config("tiny"), name="mini", train_counts=(1, 1, 1),
                               validation_counts=(0, 0, 0), test_counts=(1, 0, 0))


def other_config(config):
    return dataclasses.replace(config, seed=7, train_counts=(2, 0, 0), test_counts=(0, 0, 0))


# --- generate --overwrite ------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_generate_never_touches_a_real_dataset(tmp_path, mini, capsys, overwrite):
    real = write_distributed_dataset(tmp_path / "quiz")
    before = snapshot(real)
    with pytest.raises(FileExistsError) as error:
        generate_dataset(real, mini, overwrite=overwrite, progress=False)
    message = str(error.value)
    assert str(real) in message and "quiz_0_001" in message and f"{len(before)} " in message
    assert "overwrite" not in message.replace("with or without overwrite", "")  # no advice that would delete
    assert snapshot(real) == before

    assert cli_main(["generate", "size=tiny", f"out={real}", f"overwrite={str(overwrite).lower()}"]) == 1
    err = capsys.readouterr().err
    assert str(real) in err and "overwrite=" not in err
    assert snapshot(real) == before


def test_overwrite_removes_exactly_the_listed_files_and_refuses_beside_foreign_ones(tmp_path, mini):
    root = generate_dataset(tmp_path / "synth", mini, progress=False)
    manifest = json.loads((root / MARKER_FILE).read_text())
    assert manifest["complete"] is True
    assert set(manifest["files"]) == set(snapshot(root)) - {MARKER_FILE}

    notes = root / "train" / "subtype0" / "notes.txt"
    notes.write_text("mine")
    (root / "extra").mkdir()
    before = snapshot(root)
    other = other_config(mini)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError) as error:
            generate_dataset(root, other, overwrite=overwrite, progress=False)
        assert "train/subtype0/notes.txt" in str(error.value) and "extra" in str(error.value)
        assert "holds 2 file(s)" in str(error.value) and "pass overwrite" not in str(error.value)
        assert snapshot(root) == before

    notes.unlink()
    (root / "extra").rmdir()
    with pytest.raises(FileExistsError, match="overwrite"):  # only its own files: safe to suggest overwrite
        generate_dataset(root, other, progress=False)
    generate_dataset(root, other, overwrite=True, progress=False)
    fresh = generate_dataset(tmp_path / "fresh", other, progress=False)
    assert set(snapshot(root)) == set(snapshot(fresh))  # nothing of the first config is left
    assert not (root / "test").exists() and not (root / "train" / "subtype1").exists()


def test_a_killed_generation_knows_what_it_wrote(tmp_path, mini, monkeypatch):
    write_case, calls = dataset_folder._write_case, []

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would stop it, with two cases on disk
        calls.append(args)
        write_case(*args)

    monkeypatch.setattr(dataset_folder, "_write_case", killed_after_two)
    root = tmp_path / "synth"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(root, mini, progress=False)
    monkeypatch.undo()
    manifest = json.loads((root / MARKER_FILE).read_text())
    assert manifest["complete"] is False
    on_disk = set(snapshot(root)) - {MARKER_FILE}
    assert len(on_disk) == 4 and on_disk <= set(manifest["files"])
    # a write killed before its rename leaves a hidden temporary file: that is the generator's too
    image = Path(plan_cases(mini)[2].relative_paths()[0])
    (root / image.parent).mkdir(parents=True, exist_ok=True)
    (root / image.parent / f".{image.name}.{'0' * 32}.tmp.nii.gz").write_bytes(b"half")

    generate_dataset(root, other_config(mini), overwrite=True, progress=False)
    assert set(snapshot(root)) == set(snapshot(generate_dataset(tmp_path / "fresh", other_config(mini),
                                                                progress=False)))


def test_a_killed_generation_is_completed_by_a_rerun(tmp_path, mini, monkeypatch):
    monkeypatch.setattr(dataset_folder, "_write_case", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "synth", mini, progress=False)
    monkeypatch.undo()
    root = generate_dataset(tmp_path / "synth", mini, progress=False)
    assert json.loads((root / MARKER_FILE).read_text())["complete"] is True
    assert len(discover(root).cases) == 4


def test_an_older_generator_version_is_not_regenerated_beside_foreign_files(tmp_path, mini):
    root = generate_dataset(tmp_path / "old", mini, progress=False)
    marker = json.loads((root / MARKER_FILE).read_text())
    marker["generator_version"] -= 1
    (root / MARKER_FILE).write_text(json.dumps(marker))
    (root / "train" / "subtype1" / "quiz_1_900_0000.nii.gz").write_bytes(b"a real case")
    before = snapshot(root)
    with pytest.raises(FileExistsError) as error:
        generate_dataset(root, mini, progress=False)
    assert "train/subtype1/quiz_1_900_0000.nii.gz" in str(error.value)
    assert snapshot(root) == before


def test_an_older_marker_without_a_file_list_is_upgraded_in_place(tmp_path, mini):
    root = generate_dataset(tmp_path / "synth", mini, progress=False)
    marker = json.loads((root / MARKER_FILE).read_text())
    files = marker.pop("files")
    del marker["complete"]
    (root / MARKER_FILE).write_text(json.dumps(marker))  # what generator version 3 wrote, last
    images = snapshot(root)
    generate_dataset(root, mini, progress=False)
    upgraded = json.loads((root / MARKER_FILE).read_text())
    assert upgraded["complete"] is True and upgraded["files"] == files
    assert {k: v for k, v in snapshot(root).items() if k != MARKER_FILE} == \
           {k: v for k, v in images.items() if k != MARKER_FILE}


# --- convert --overwrite -------------------------------------------------------------------------


def test_convert_overwrite_replaces_an_earlier_conversion(tmp_path, capsys):
    first = write_distributed_dataset(tmp_path / "a", train_per_subtype=2, test_cases=2, seed=0)
    second = write_distributed_dataset(tmp_path / "b", train_per_subtype=1, test_cases=1, seed=1)
    target = tmp_path / "Dataset501"
    assert cli_main(["convert", f"source={first}", f"destination={target}"]) == 0
    assert cli_main(["convert", f"source={second}", f"destination={target}"]) == 1
    assert "overwrite=true" in capsys.readouterr().err
    assert cli_main(["convert", f"source={second}", f"destination={target}", "overwrite=true"]) == 0
    reference = convert_to_nnunet(second, tmp_path / "reference").root
    assert set(snapshot(target)) == set(snapshot(reference))
    assert cli_main(["check", f"root={target}", "workers=0"]) == 0
    assert [c.case_id for c in discover(target).cases] == [c.case_id for c in discover(second).cases]


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_refuses_a_target_holding_foreign_files(tmp_path, capsys, overwrite):
    source = write_distributed_dataset(tmp_path / "quiz", train_per_subtype=1, test_cases=1)
    other = convert_to_nnunet(source, tmp_path / "Dataset502").root
    (other / "conversion.json").unlink(missing_ok=True)  # a dataset it did not write (e.g. nnU-Net's own)
    (other / "README.txt").write_text("ours")
    before = snapshot(other)
    assert cli_main(["convert", f"source={source}", f"destination={other}",
                     f"overwrite={str(overwrite).lower()}"]) == 1
    err = capsys.readouterr().err
    assert str(other) in err and "dataset.json" in err and "overwrite=" not in err
    assert snapshot(other) == before


# --- data.source ---------------------------------------------------------------------------------


def compose_train(output_root: Path, overrides: list[str], run_dir: Path | None = None):
    """train.yaml composed as train.py would; with ``run_dir``, ready for ``train.train``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.root_dir={REPO_ROOT}", f"paths.output_root={output_root}", "planning=small",
            "planning.spacing_scale=2", "data.preprocessing_workers=0", "data.progress=false", *overrides],
            return_hydra_config=run_dir is not None)
    if run_dir is not None:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
            del cfg["hydra"]  # as under @hydra.main
    return cfg


@pytest.fixture
def no_generator(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the generator was called: {args}")

    monkeypatch.setattr(dataset_folder, "generate_dataset", refuse)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_a_folder_of_ones_own(experiment, tmp_path):
    cfg = compose_train(tmp_path / "outputs", [f"experiment={experiment}", "data=folder", "data.root=/x"])
    assert cfg.data.source == "folder" and cfg.data.root == "/x" and "synthetic" not in cfg.data


def test_a_folder_source_prepares_that_folder_and_generates_nothing(distributed_dataset, tmp_path,
                                                                     no_generator):
    before = snapshot(distributed_dataset)
    cfg = compose_train(tmp_path / "outputs", ["experiment=cpu_demo", "data=folder",
                                                f"data.root={distributed_dataset}"])
    prepared = prepare_dataset(cfg.data, cfg.planning, progress=False)
    assert prepared.index.root == distributed_dataset
    assert len(prepared.split.train) + len(prepared.split.inner) == 6   # the demo holds 16% out to choose its checkpoint
    assert snapshot(distributed_dataset) == before
    assert not (tmp_path / "outputs" / "data").exists()


@pytest.mark.slow
def test_the_demo_experiment_trains_on_a_folder_of_ones_own(distributed_dataset, tmp_path, no_generator):
    from pancreas_mtl.training.train import train

    before = snapshot(distributed_dataset)
    cfg = compose_train(tmp_path / "outputs", [
        "experiment=cpu_demo", "data=folder", f"data.root={distributed_dataset}", "debug=fdr",
        "trainer.accelerator=cpu", "trainer.precision=32-true"], run_dir=tmp_path / "run")
    train(cfg)
    assert (tmp_path / "run" / "plan.json").is_file()
    assert snapshot(distributed_dataset) == before and not (tmp_path / "outputs" / "data").exists()


def test_a_missing_folder_is_an_error_naming_it(tmp_path, no_generator):
    missing = tmp_path / "not_mounted"
    cfg = compose_train(tmp_path / "outputs", ["experiment=cpu_demo", "data=folder", f"data.root={missing}"])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_dataset(cfg.data, cfg.planning, progress=False)
    assert not missing.exists()
    cfg = compose_train(tmp_path / "outputs", ["data=folder"])
    with pytest.raises(ValueError, match="data.root"):
        prepare_dataset(cfg.data, cfg.planning, progress=False)


@pytest.mark.parametrize("holds", ["nothing", "a real dataset"])
def test_the_synthetic_source_never_generates_into_a_folder_the_user_named(tmp_path, no_generator, holds):
    named = tmp_path / "my_data"
    if holds == "a real dataset":
        write_distributed_dataset(named)
    else:
        named.mkdir()
    before = snapshot(named)
    cfg = compose_train(tmp_path / "outputs", ["experiment=cpu_demo", f"data.root={named}"])
    assert cfg.data.source == "synthetic"
    with pytest.raises(ValueError) as error:
        prepare_dataset(cfg.data, cfg.planning, progress=False)
    assert str(named) in str(error.value) and "data=folder" in str(error.value)
    assert snapshot(named) == before and not (named / MARKER_FILE).exists()


@pytest.fixture
def recorded_generator(monkeypatch):
    """The generator replaced by a recorder of the folders it is asked to write."""
    roots = []
    monkeypatch.setattr(dataset_folder, "generate_dataset", lambda root, config, **kwargs: roots.append(root))
    return roots


def test_the_synthetic_source_generates_under_the_data_dir(tmp_path, recorded_generator):
    cfg = compose_train(tmp_path / "outputs", ["experiment=cpu_demo", "data.synthetic.size=tiny"])
    expected = tmp_path / "outputs" / "data" / "synthetic_tiny"
    assert dataset_root(cfg.data) == expected and recorded_generator == [expected]


def test_a_folder_the_generator_wrote_may_be_named(tmp_path, mini, recorded_generator):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    marker = {"generator_version": GENERATOR_VERSION, "config": mini.to_dict(), "complete": True, "files": []}
    (elsewhere / MARKER_FILE).write_text(json.dumps(marker))
    cfg = compose_train(tmp_path / "outputs", ["experiment=cpu_demo", f"data.root={elsewhere}"])
    assert dataset_root(cfg.data) == elsewhere and recorded_generator == [elsewhere]


def test_a_python_config_without_source(tmp_path, distributed_dataset, recorded_generator):
    """Dicts built in Python (tests, notebooks) may leave ``source`` out: a ``synthetic`` node means that."""
    real = str(distributed_dataset)
    assert dataset_root({"root": real}) == distributed_dataset
    ignored = {"size": "tiny"}
    assert dataset_root({"root": real, "source": "folder", "synthetic": ignored}) == distributed_dataset
    assert recorded_generator == []
    fresh = tmp_path / "synth"
    assert dataset_root({"root": str(fresh), "synthetic": {"size": "tiny", "seed": 0}}) == fresh
    assert recorded_generator == [fresh]
    with pytest.raises(ValueError, match="data.source"):
        dataset_root({"root": str(fresh), "source": "nnunet"})


GENERATE_SCRIPT = """
import sys
from pancreas_mtl.dataset.prepare import dataset_root
print(dataset_root({"root": sys.argv[1], "synthetic": {"size": "tiny", "seed": 0}}, progress=False))
"""


@pytest.mark.slow
def test_jobs_starting_together_generate_the_synthetic_set_once(tmp_path):
    # the jobs of a multirun (folds, preprocessing shards) all find the set missing at their start
    import subprocess
    import sys

    from pancreas_mtl.synthetic.dataset_folder import MARKER_FILE

    root = tmp_path / "data" / "synthetic_tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", GENERATE_SCRIPT, str(root)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [job.communicate(timeout=300) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in results]
    marker = json.loads((root / MARKER_FILE).read_text())
    assert marker["complete"] and all((root / name).is_file() for name in marker["files"])
