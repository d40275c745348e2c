"""Reliability, round three: damaged cache entries are found and rebuilt, a bad W&B run id or a failing
wandb.init never stops training, and a model folder pointing outside itself is refused when opened."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.raw.layout import discover
from pancreas_mtl.dataset.cache import build_cache, dataset_cache_root
from pancreas_mtl.files import load_json, save_json, sha256
from pancreas_mtl.training.loggers import build_loggers
from pancreas_mtl.tracking.settings import training_runs
from tests.predict_helpers import CONF, save_checkpoint, tiny_plan
from tests.test_resampling import small_plan
from tests.test_wandb_dashboards import offline_wandb  # noqa: F401 - the fixture

# --- 1. the preprocessing cache: a checksum per array, checked before every run ------------------------

CACHE_LOG = "pancreas_mtl.dataset.cache"
CHECKSUMS = "sha256"  # an entry's JSON: {file name: SHA-256} of its arrays


@pytest.fixture
def cache(distributed_dataset, tmp_path):
    index = discover(distributed_dataset)
    plan = small_plan()
    root = dataset_cache_root(tmp_path / "cache", index)
    entries = build_cache(index, plan, root, cases=index.labelled, progress=False)
    return index, plan, root, root / plan.preprocessing_key(), entries


def _damage(path: Path, kind: str) -> None:
    """Overwrite an array with one of the same shape and dtype: its header and size do not change."""
    array = np.load(path)
    if kind == "image":
        array = np.full_like(array, np.nan)
    elif kind == "seg":
        array = np.zeros_like(array)
    else:
        array = array[::-1].copy()
    np.save(path, array)


@pytest.mark.parametrize("kind", ["image", "seg", "fg"])
def test_a_damaged_array_is_found_named_and_rebuilt(cache, caplog, kind):
    index, plan, root, folder, entries = cache
    damaged, kept = index.labelled[:2]
    path = folder / f"{damaged.case_id}_{kind}.npy"
    original = np.load(path)
    _damage(path, kind)
    kept_mtime = (folder / f"{kept.case_id}_image.npy").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        rebuilt = {e.case_id: e for e in build_cache(index, plan, root, cases=index.labelled, progress=False)}
    [warning] = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert damaged.case_id in warning and str(path) in warning and "rebuil" in warning
    np.testing.assert_array_equal(np.load(path), original)
    assert np.isfinite(rebuilt[damaged.case_id].load_image()).all()
    assert (folder / f"{kept.case_id}_image.npy").stat().st_mtime_ns == kept_mtime  # the good cases are kept


def test_entries_carry_the_checksums_of_their_files(cache):
    _, _, _, folder, entries = cache
    properties = entries[0].properties()
    names = {entries[0].image_path.name, entries[0].seg_path.name, entries[0].foreground_path.name}
    assert set(properties[CHECKSUMS]) == names
    assert all(properties[CHECKSUMS][name] == sha256(folder / name) for name in names)


def test_an_entry_written_before_checksums_is_adopted_and_a_non_finite_one_rebuilt(cache, caplog):
    index, plan, root, folder, entries = cache
    adopted, broken = entries[:2]
    for entry in (adopted, broken):
        properties = entry.properties()
        del properties[CHECKSUMS]
        save_json(properties, entry.properties_path)
    _damage(broken.image_path, "image")
    mtime = adopted.image_path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        build_cache(index, plan, root, cases=index.labelled, progress=False)
    assert adopted.image_path.stat().st_mtime_ns == mtime  # not rebuilt: its checksums are added
    assert adopted.properties()[CHECKSUMS][adopted.image_path.name] == sha256(adopted.image_path)
    assert np.isfinite(np.load(broken.image_path)).all() and CHECKSUMS in broken.properties()
    assert any(broken.case_id in r.getMessage() and "not finite" in r.getMessage() for r in caplog.records)


# --- 2. W&B: a bad run id from a checkpoint, a failing wandb.init ---------------------------------------

def _logger_cfg():
    """conf/logger/csv.yaml and wandb.yaml, with save_dir left to build_loggers."""
    entries = {**OmegaConf.to_container(OmegaConf.load(CONF / "logger/csv.yaml")),
               **OmegaConf.to_container(OmegaConf.load(CONF / "logger/wandb.yaml"))}
    for entry in entries.values():
        entry["save_dir"] = None
    return entries


@pytest.mark.parametrize("run_id", ["ab/cd", "x:y", "no spaces", "", "semi;colon"])
def test_an_invalid_run_id_in_a_checkpoint_is_named_and_left_out(tmp_path, caplog, run_id):
    bad, good = tmp_path / "bad.ckpt", tmp_path / "good.ckpt"
    torch.save({"wandb": {"id": run_id, "project": "p"}}, bad)
    torch.save({"wandb": {"id": "Ab-3_x9", "project": "p"}}, good)
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.tracking.settings"):
        assert [reference["id"] for reference in training_runs([bad, good])] == ["Ab-3_x9"]
    if run_id:  # an empty id was never a reference
        [warning] = [r.getMessage() for r in caplog.records]
        assert str(bad) in warning and repr(run_id) in warning and "new W&B run" in warning


def test_an_invalid_resumed_run_id_starts_a_new_wandb_run(offline_wandb, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.training.loggers"):
        loggers = build_loggers(_logger_cfg(), offline_wandb / "run", config={"seed": 1},
                                resumed_run={"id": "ab/cd:ef"})
    [wandb_logger] = [logger for logger in loggers if type(logger).__name__ == "WandbLogger"]
    assert wandb_logger.experiment.id != "ab/cd:ef" and "'ab/cd:ef'" in caplog.text


def test_a_failing_wandb_init_leaves_the_other_loggers(offline_wandb, monkeypatch, caplog):  # noqa: F811
    import wandb

    def refuse(*args, **kwargs):
        raise wandb.errors.UsageError("Run ID cannot contain the characters: :;,#?/'")

    monkeypatch.setattr(wandb, "init", refuse)
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.training.loggers"):
        loggers = build_loggers(_logger_cfg(), offline_wandb / "run", config={"seed": 1})
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger"]
    assert "logger 'wandb'" in caplog.text and "Run ID cannot contain" in caplog.text
    assert "the other loggers: CSVLogger" in caplog.text


def test_a_configured_id_wandb_refuses_falls_back_too(offline_wandb, caplog):  # noqa: F811
    cfg = _logger_cfg()
    cfg["wandb"]["id"] = "a#b"
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.training.loggers"):
        loggers = build_loggers(cfg, offline_wandb / "run", config={"seed": 1})
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger"] and "logger.wandb.id" in caplog.text


# --- 3. exported model folders: every path stays inside the folder --------------------------------------
# no engine runs: the export writes model.onnx with torch's exporter (verify=false), and opening a folder
# reads it with the onnx package only, so these stay in the pytest worker (tests/forked.py)

@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    from pancreas_mtl.commands.cli import main
    from pancreas_mtl.inference import model_folder as module

    # the export's check that ONNX Runtime is installed imports it; nothing else of it runs here
    monkeypatch.setattr(module, "resolve_engine", lambda requested, device, torch_possible=True: requested)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan(), seed=3)
    out = tmp_path / "model"
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime", "verify=false"]) == 0
    return out


def _edit_manifest(folder: Path, edit) -> None:
    """Change the manifest and sign it again, as someone handing over a crafted folder would."""
    manifest = load_json(folder / "manifest.json")
    edit(manifest)
    manifest["sha256"] = {name: sha256(folder / name) for name in manifest["sha256"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _external_onnx(folder: Path, location: str) -> None:
    """model.onnx with its first weight stored as external data at ``location``."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(folder / "model.onnx"))
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    onnx.save(model, str(folder / "model.onnx"))
    _edit_manifest(folder, lambda manifest: None)


@pytest.mark.parametrize("location", ["/etc/passwd", "../c.ckpt", "weights.bin"])
def test_onnx_external_data_outside_the_folder_or_unlisted_is_refused_on_opening(model_folder, location):
    from pancreas_mtl.inference.checkpoint import load_predictable

    if location == "weights.bin":
        (model_folder / "weights.bin").write_bytes(b"\0" * 4096)
    _external_onnx(model_folder, location)
    with pytest.raises(ValueError) as refused:
        load_predictable(model_folder)
    message = str(refused.value)
    assert str(model_folder / "model.onnx") in message and repr(location) in message
    assert ("not listed in" if location == "weights.bin" else "outside the model folder") in message


@pytest.mark.parametrize("entry", ["../secret", "/etc/passwd"])
def test_a_manifest_entry_outside_the_folder_is_refused_naming_it(model_folder, entry):
    from pancreas_mtl.inference.checkpoint import load_predictable

    _edit_manifest(model_folder, lambda manifest: manifest["files"].append(entry))
    with pytest.raises(ValueError, match="outside the model folder") as refused:
        load_predictable(model_folder)
    assert repr(entry) in str(refused.value) and "manifest.json" in str(refused.value)


def test_a_listed_file_linking_outside_the_folder_is_refused(model_folder, tmp_path):
    from pancreas_mtl.inference.model_folder import read_model_folder

    elsewhere = tmp_path / "elsewhere.onnx"
    (model_folder / "model.onnx").replace(elsewhere)
    os.symlink(elsewhere, model_folder / "model.onnx")  # same bytes, same SHA-256
    with pytest.raises(ValueError, match="outside the model folder") as refused:
        read_model_folder(model_folder)
    assert str(model_folder / "model.onnx") in str(refused.value)


@pytest.mark.parametrize(("content", "says"), [("{not json", "not a JSON object"),
                                              ('{"format": "something else"}', "format 'something else'")])
def test_a_model_folder_with_an_unreadable_manifest_says_so(model_folder, content, says):
    from pancreas_mtl.inference.checkpoint import load_predictable

    (model_folder / "manifest.json").write_text(content)
    with pytest.raises(ValueError) as refused:
        load_predictable(model_folder)
    message = str(refused.value)
    assert str(model_folder / "manifest.json") in message and says in message
    assert "with its manifest" not in message  # today's "a folder, expected a checkpoint" when there is one
