"""The CPU inference engines (OpenVINO, ONNX Runtime): agreement with torch for every head, the fallback
when a package is missing, the disk cache, and the exported model folder that predict.py runs."""

from __future__ import annotations

import json
import logging
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.commands.cli import main
from pancreas_mtl.dataset.preprocessing import PreprocessedCase
from pancreas_mtl.inference import input_grid as export_module
from pancreas_mtl.inference.engines import (
    EngineUnavailable,
    cpu_has_bf16,
    resolve_engine,
    resolve_engine_precision,
)
from pancreas_mtl.inference.model_folder import MANIFEST, read_model_folder
from pancreas_mtl.inference.onnx_graph import _central_differences, _logical_where
from pancreas_mtl.inference.predictor import Predictor
from pancreas_mtl.models.multitask import build_model
from tests.predict_helpers import CONF, run_predict, save_checkpoint, settings, tiny_plan, write_cases

# OpenVINO / ONNX Runtime run here, each test in a forked child of the worker (tests/conftest.py)
pytestmark = pytest.mark.engines
WORKER_PID = os.getpid()  # collection runs in the pytest worker

HEADS = ["none", "single_stage", "multistage", "ovr", "lesion_attention"]
# (engine, precision, least argmax agreement, largest probability difference)
ENGINE_CASES = [("openvino", "fp32", 0.999, 1e-4), ("onnxruntime", "fp32", 0.999, 1e-4),
                ("openvino", "bf16", 0.98, 0.05)]


def three_stage_plan():
    """Three stages (divisor 4), patch 16 x 32 x 32: every head has decoder stages to pool."""
    return tiny_plan(patch=(16, 32, 32), strides=[(1, 1, 1), (2, 2, 2), (2, 2, 2)], kernel_sizes=[(3, 3, 3)] * 3,
                     features_per_stage=[4, 8, 16], n_blocks_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])


def network_with_head(head: str, plan, seed: int = 0):
    model_cfg = {"backbone": OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/resenc.yaml")),
                 "head": OmegaConf.to_container(OmegaConf.load(CONF / f"model/head/{head}.yaml"))}
    torch.manual_seed(seed)
    return build_model(model_cfg, plan).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 20, 40, 48, generator=torch.Generator().manual_seed(1))


def test_engine_tests_run_in_a_forked_child_of_the_worker():
    assert os.getpid() != WORKER_PID and os.getppid() == WORKER_PID


@pytest.mark.parametrize("engine, precision, agreement, tolerance", ENGINE_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("head", HEADS)
def test_every_head_on_every_engine_agrees_with_torch(head, engine, precision, agreement, tolerance, image):
    pytest.importorskip(engine)
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("no native bf16 on this CPU")
    plan = three_stage_plan()
    network = network_with_head(head, plan)
    # 8 windows of 16 x 32 x 32, 3 per engine call: the last call runs 2 windows; mirroring over z
    window_settings = dict(mirror_axes=[0], sw_batch_size=3)
    reference = Predictor([network], plan, settings(engine="torch", **window_settings), device="cpu",
                          precision="fp32").predict_preprocessed(image)
    predictor = Predictor([network], plan, settings(engine=engine, **window_settings), device="cpu",
                          precision=precision)
    assert predictor.engine == engine and predictor.members[0].precision == precision
    result = predictor.predict_preprocessed(image)
    assert result.windows == reference.windows == 16
    same = (result.probabilities.argmax(0) == reference.probabilities.argmax(0)).float().mean().item()
    assert same >= agreement
    assert (result.probabilities - reference.probabilities).abs().max().item() < tolerance
    if head == "none":
        assert result.subtype_probabilities is None
    else:
        assert torch.allclose(result.subtype_probabilities, reference.subtype_probabilities, atol=tolerance)
        assert result.subtype_probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_auto_is_openvino_on_the_cpu_and_torch_on_gpus():
    pytest.importorskip("openvino")
    assert resolve_engine("auto", torch.device("cpu")) == "openvino"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="engine must be one of"):
        settings(engine="tensorrt")


def test_precision_per_engine():
    assert resolve_engine_precision("auto", "onnxruntime") == "fp32"
    assert resolve_engine_precision("fp32", "openvino") == "fp32"
    assert resolve_engine_precision("auto", "openvino") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="onnxruntime runs fp32"):
        resolve_engine_precision("bf16", "onnxruntime")
    with pytest.raises(ValueError, match="fp16 is a GPU precision"):
        resolve_engine_precision("fp16", "openvino")


def test_auto_without_openvino_falls_back_to_torch_with_one_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    plan = tiny_plan()
    with caplog.at_level(logging.INFO, logger="pancreas_mtl.inference.engines"):
        predictor = Predictor([network_with_head("single_stage", plan)], plan, settings(engine="auto"), device="cpu")
    assert predictor.engine == "torch" and predictor.describe_engine() == "torch float32"
    lines = [r for r in caplog.records if r.name == "pancreas_mtl.inference.engines"]
    assert len(lines) == 1 and "pip install -e '.[cpu]'" in lines[0].getMessage()


def test_an_engine_asked_for_by_name_and_missing_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    plan = tiny_plan()
    with pytest.raises(EngineUnavailable, match=r"inference.engine=onnxruntime .*pip install -e '\.\[cpu\]'"):
        Predictor([network_with_head("single_stage", plan)], plan, settings(engine="onnxruntime"), device="cpu")


def test_the_disk_cache_is_reused_by_a_second_predictor(tmp_path, image):
    pytest.importorskip("openvino")
    plan = three_stage_plan()
    network = network_with_head("multistage", plan)
    cache = tmp_path / "engines"
    first = Predictor([network], plan, settings(engine="openvino"), device="cpu", precision="fp32", engine_cache=cache)
    expected = first.predict_preprocessed(image).probabilities
    onnx_files = sorted((cache / "onnx").rglob("*.onnx"))
    assert first.members[0].network.onnx_cache.exported == 1 and len(onnx_files) == 1
    assert onnx_files[0].name == "2x1x16x32x32.onnx" and any((cache / "openvino").iterdir())
    mtime = onnx_files[0].stat().st_mtime_ns

    second = Predictor([network], plan, settings(engine="openvino"), device="cpu", precision="fp32",
                       engine_cache=cache)
    assert torch.equal(second.predict_preprocessed(image).probabilities, expected)
    assert second.members[0].network.onnx_cache.exported == 0 and onnx_files[0].stat().st_mtime_ns == mtime
    assert second.identity() == first.identity() and first.identity()["engine"] == "openvino"
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]

    other = network_with_head("multistage", plan, seed=1)  # other weights: another cache entry
    Predictor([other], plan, settings(engine="openvino"), device="cpu", precision="fp32",
              engine_cache=cache).predict_preprocessed(image)
    assert len(list((cache / "onnx").rglob("*.onnx"))) == 2


def test_central_differences_and_logical_where_equal_torch():
    values = torch.randn(2, 1, 5, 6, 7)
    for expected, found in zip(torch.gradient(values, dim=(2, 3, 4)), _central_differences(values, dim=(2, 3, 4))):
        assert torch.allclose(expected, found, atol=1e-6)
    condition, a, b = (torch.rand(4, 9) > 0.5 for _ in range(3))
    assert torch.equal(_logical_where(condition, a, b), torch.where(condition, a, b))
    x = torch.randn(4, 9)
    assert torch.equal(_logical_where(condition, x, -x), torch.where(condition, x, -x))


def test_restoring_the_input_grid_stays_on_the_device_of_the_probabilities(monkeypatch):
    """The resampling back to the input grid runs where the probabilities are (the GPU when one
    predicted): nothing moves them to the CPU before it."""
    seen = []
    original = export_module.resample_image

    def spy(probabilities, shape, axis=None, order=1):
        seen.append((probabilities.device, order))
        result = original(probabilities, shape, axis, order)
        assert result.device == probabilities.device
        return result

    monkeypatch.setattr(export_module, "resample_image", spy)
    preprocessed = PreprocessedCase(image=np.zeros((1, 4, 6, 6), np.float32), bbox=((1, 9), (0, 12), (2, 14)),
                                    original_shape=(10, 12, 16), original_spacing=(1.0, 0.5, 0.5),
                                    anisotropy_threshold=3.0, seg=None)
    probabilities = torch.rand(3, 4, 6, 6).softmax(0)
    labels, kept = export_module.restore_original_geometry(probabilities, preprocessed, (2.0, 1.0, 1.0), True)
    assert seen == [(probabilities.device, 1)] and labels.shape == (10, 12, 16) and kept.shape == (3, 10, 12, 16)


# --- the exported model folder -------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "c.ckpt", tiny_plan(), seed=3)


@pytest.mark.slow  # about 10 s: an export and five predict.py runs
def test_export_writes_a_folder_that_predicts_the_checkpoint_s_masks(tmp_path, checkpoint, capsys):
    pytest.importorskip("openvino")
    out = tmp_path / "model"
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "precision=fp32"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model.bin", "model.onnx", "model.xml", "plan.json", "weights.pt"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert manifest["window_shape"] == [2, 1, 8, 16, 16] and manifest["complete"]
    assert manifest["head"] == {"num_subtypes": 3, "loss_kind": "ce", "probabilities": "softmax"}
    assert manifest["lesion_channel"] == 2 and manifest["outputs"] == ["seg_logits", "class_logits"]
    assert manifest["verification"]["argmax_agreement"] >= 0.999
    assert read_model_folder(out).plan == tiny_plan()

    cases = tmp_path / "cases"
    names = write_cases(cases, count=2)
    common = [f"input={cases}", "inference=fast", "precision=fp32", "inference.engine=openvino"]
    from_checkpoint = run_predict([f"ckpt={checkpoint}", f"output={tmp_path / 'a'}", *common])
    from_folder = run_predict([f"ckpt={out}", f"output={tmp_path / 'b'}", *common])
    assert sorted(from_checkpoint.predicted) == sorted(from_folder.predicted) == names
    for name in names:
        a = np.asanyarray(nib.load(str(tmp_path / "a" / f"{name}.nii.gz")).dataobj)
        b = np.asanyarray(nib.load(str(tmp_path / "b" / f"{name}.nii.gz")).dataobj)
        assert (a == b).mean() >= 0.999
    assert ((tmp_path / "a" / "subtype_results.csv").read_text()
            == (tmp_path / "b" / "subtype_results.csv").read_text())

    # onnxruntime runs the same folder; a preset asking for other window shapes is refused before any case
    run_predict([f"ckpt={out}", f"output={tmp_path / 'c'}", f"input={cases}", "inference=fast",
                 "inference.engine=onnxruntime"])
    with pytest.raises(ValueError, match="runs its windows"):
        run_predict([f"ckpt={out}", f"output={tmp_path / 'd'}", f"input={cases}", "inference=fastest"])
    with pytest.raises(ValueError, match="not torch"):
        run_predict([f"ckpt={out}", f"output={tmp_path / 'e'}", f"input={cases}", "inference.engine=torch"])


def test_export_refuses_a_foreign_folder_and_replaces_only_its_own(tmp_path, checkpoint, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime"]) == 1
    assert "notes.txt" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    (out / "notes.txt").unlink()
    (out / MANIFEST).write_text('{"files": []}')  # someone else's manifest.json
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime", "overwrite=true"]) == 1
    assert "manifest.json" in capsys.readouterr().err and (out / MANIFEST).read_text() == '{"files": []}'
    (out / MANIFEST).unlink()
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime", "verify=false"]) == 0
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime"]) == 1
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["export", f"ckpt={checkpoint}", f"out={out}", "engine=onnxruntime", "overwrite=true"]) == 0
    assert "verification" in json.loads((out / MANIFEST).read_text())

    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))   # an export killed midway
    with pytest.raises(ValueError, match="did not finish"):
        read_model_folder(out)
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:-10])  # a partial copy
    with pytest.raises(ValueError, match="SHA-256 differs"):
        read_model_folder(out)


def test_a_partial_last_batch_runs_its_own_size_not_padded_windows(image):
    """A case of one window with sw_batch_size 2 costs one window through the engine (a checkpoint's network
    is exported for the batch it needs); an exported folder has one shape and pads instead."""
    pytest.importorskip("onnxruntime")
    plan = three_stage_plan()
    network = network_with_head("multistage", plan)
    predictor = Predictor([network], plan, settings(engine="onnxruntime", sw_batch_size=2, mirror_axes=[]),
                          device="cpu", precision="fp32")
    engine_network = predictor.members[0].network
    one_window = image[:, :16, :32, :32]
    result = predictor.predict_preprocessed(one_window)
    assert result.windows == 1
    assert sorted(engine_network._runners) == [(1, 1, 16, 32, 32)]
    reference = Predictor([network], plan, settings(engine="torch", sw_batch_size=2, mirror_axes=[]), device="cpu",
                          precision="fp32").predict_preprocessed(one_window)
    assert (result.probabilities - reference.probabilities).abs().max().item() < 1e-4

    engine_network.exact_batches = False    # as for an exported folder: padded to the compiled batch
    engine_network._runners.clear()
    padded = predictor.predict_preprocessed(one_window)
    assert sorted(engine_network._runners) == [(2, 1, 16, 32, 32)]
    assert (padded.probabilities - result.probabilities).abs().max().item() < 1e-5
