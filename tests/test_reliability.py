"""Bad inputs and failures not covered elsewhere (docs/reliability.md lists every case with its test): odd
geometry and constant images, masks without a lesion, checkpoints of another network, truncated or
code-carrying checkpoints, out of GPU memory during prediction, the non-finite loss log, and a seeded
property-based test that prediction lands on the input's grid for random volumes, affines and dtypes."""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pancreas_mtl.training.checkpointing import AtomicCheckpointIO, step_checkpoint
from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.raw.layout import Case, discover
from pancreas_mtl.files import load_json
from pancreas_mtl.inference import runner
from pancreas_mtl.inference.checkpoint import load_network, read_checkpoint
from pancreas_mtl.inference.output_folder import record_path
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import predict_cases
from pancreas_mtl.inference.sliding_window import OutOfMemoryError, _Stitcher, predict_windows
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.models.multitask import build_model
from pancreas_mtl.training.module import build_module
from pancreas_mtl.planning.fingerprint import compute_fingerprint
from tests.conftest import lps_affine, make_case_arrays
from tests.predict_helpers import CONF, Pointwise, save_checkpoint, tiny_plan
from tests.test_module import run_config

SUBTYPE_COUNTS = {0: 2, 1: 2, 2: 2}


def write_case(folder: Path, image: np.ndarray, mask: np.ndarray | None, image_affine=None, mask_affine=None,
               name: str = "c") -> Case:
    image_path = write_nifti(image, lps_affine() if image_affine is None else image_affine,
                             folder / f"{name}_0000.nii.gz")
    mask_path = None
    if mask is not None:
        mask_path = write_nifti(mask, lps_affine() if mask_affine is None else mask_affine,
                                folder / f"{name}.nii.gz")
    return Case(name, (image_path,), mask_path, 0, "train")


def assert_names_case_and_file(error: pytest.ExceptionInfo, case: str, file_name: str) -> None:
    assert f"case {case}" in str(error.value) and file_name in str(error.value), str(error.value)


# --- bad inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slices", [1, 2])
def test_one_or_two_slices_are_rejected(tmp_path, slices):
    image, mask = make_case_arrays(np.random.default_rng(0))
    case = write_case(tmp_path, image[:slices], mask[:slices])
    with pytest.raises(DataError, match=r"at least 3 voxels along every axis, found shape \(z, y, x\) "
                                        rf"\({slices}, 28, 36\)") as error:
        load_case(case)
    assert_names_case_and_file(error, "c", "c_0000.nii.gz")


def test_mask_with_another_spacing_is_rejected(tmp_path):
    image, mask = make_case_arrays(np.random.default_rng(0))
    case = write_case(tmp_path, image, mask, mask_affine=lps_affine((3.0, 0.8, 0.8)))
    with pytest.raises(DataError, match="mask affine differs from the image's") as error:
        load_case(case)
    assert_names_case_and_file(error, "c", "c.nii.gz")


def test_negative_spacing_in_header_is_rejected(tmp_path):
    image, _ = make_case_arrays(np.random.default_rng(0))
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), None), str(tmp_path / "plain.nii"))
    header = bytearray((tmp_path / "plain.nii").read_bytes())
    header[80:84] = struct.pack("<f", -0.8)  # pixdim[2], the y spacing
    path = tmp_path / "neg_0000.nii.gz"
    path.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(DataError, match=r"spacing \(pixdim, x y z\) must be positive, found \(.*-0\.8") as err:
        load_case(Case("neg", (path,), None, None, "test"))
    assert_names_case_and_file(err, "neg", "neg_0000.nii.gz")


@pytest.mark.parametrize("value, dtype", [(-1000, np.int16), (0.0, np.float32)])
def test_constant_image_is_rejected(tmp_path, value, dtype):
    case = write_case(tmp_path, np.full((12, 28, 36), value, dtype), None)
    with pytest.raises(DataError, match="varying intensities, found the constant") as error:
        load_case(case)
    assert_names_case_and_file(error, "c", "c_0000.nii.gz")


def test_masks_without_lesion_or_without_label_1_are_accepted(distributed_dataset, caplog):
    """A lesion-free pancreas and a lesion without pancreas label are valid masks: loaded and fingerprinted,
    the first with a warning naming the case (its subtype cannot be learnt from it)."""
    folder = distributed_dataset / "train"
    _, mask = make_case_arrays(np.random.default_rng(0))
    no_lesion, no_label_1 = np.where(mask == 2, 1, mask), np.where(mask == 1, 0, mask)
    write_nifti(no_lesion.astype(np.uint8), lps_affine(), folder / "subtype0" / "quiz_0_001.nii.gz")
    write_nifti(no_label_1.astype(np.uint8), lps_affine(), folder / "subtype1" / "quiz_1_003.nii.gz")
    index = discover(distributed_dataset)
    cases = {case.case_id: case for case in index.labelled}
    assert set(np.unique(load_case(cases["quiz_0_001"]).seg)) == {0, 1}
    assert set(np.unique(load_case(cases["quiz_1_003"]).seg)) == {0, 2}
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.planning.fingerprint"):
        fingerprint = compute_fingerprint(index, progress=False)
    assert "quiz_0_001" in fingerprint.case_ids and "quiz_1_003" in fingerprint.case_ids
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "no lesion" in warned and "quiz_0_001" in warned and "quiz_1_003" not in warned


# --- checkpoints ------------------------------------------------------------------------------------------

def module_for(plan, head: str = "multistage"):
    cfg = run_config()
    cfg.model.head = OmegaConf.load(CONF / f"model/head/{head}.yaml")
    torch.manual_seed(0)
    return build_module(cfg, plan, SUBTYPE_COUNTS)


def training_checkpoint(module) -> dict:
    """What Lightning saves for the weights, with our plan and config."""
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize("other_plan, other_head, differs", [
    ({"features_per_stage": [8, 16]}, "multistage", "plan.features_per_stage: [4, 8] vs [8, 16]"),
    ({}, "single_stage", "model.head._target_"),
])
def test_resuming_from_another_plan_or_head_is_a_clear_mismatch(other_plan, other_head, differs):
    ours = module_for(tiny_plan())
    theirs = training_checkpoint(module_for(tiny_plan(**other_plan), other_head))
    with pytest.raises(ValueError, match="another network than this run builds") as error:
        ours.on_load_checkpoint(theirs)
    message = str(error.value)
    assert differs in message and "tensor(s)" in message and "size mismatch" not in message
    ours.on_load_checkpoint(training_checkpoint(module_for(tiny_plan())))  # the same network loads


def test_checkpoint_whose_weights_do_not_fit_its_plan_names_the_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["pancreas_mtl"]["plan"]["features_per_stage"] = [8, 16]  # put together from two runs
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"do not fit the network its plan and config describe") as error:
        load_network(path)
    assert str(path) in str(error.value) and "of another shape" in str(error.value)
    assert "stem" in str(error.value) and "size mismatch" not in str(error.value)


def test_truncated_checkpoint_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"c\.ckpt: cannot read the checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=r"c\.ckpt: cannot read the checkpoint"):
        Predictor.from_checkpoints(path, device="cpu")


class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_checkpoint_carrying_code_is_refused_unrun(tmp_path):
    path = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["pancreas_mtl"]["extra"] = RunsCode(tmp_path / "pwned")
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"holds objects other than tensors and plain values"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_killed_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    writer = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"global_step": 2}, last)

    def killed_mid_write(obj, target):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")  # what a kill during the write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"global_step": 4}, last)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True) == {"global_step": 2}
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_step_checkpoint_is_off_by_default_and_a_knob(tmp_path):
    from hydra.utils import instantiate

    from pancreas_mtl.training.train import build_callbacks

    callbacks = OmegaConf.create({"callbacks": OmegaConf.load(CONF / "callbacks/default.yaml")})
    callbacks.callbacks.model_checkpoint.dirpath = callbacks.callbacks.last_checkpoint.dirpath = str(tmp_path)
    assert instantiate(callbacks.callbacks.step_checkpoint) is None
    def step_triggered(cfg):
        return [c for c in build_callbacks(cfg, with_logger=False) if getattr(c, "_every_n_train_steps", 0)]

    assert not step_triggered(callbacks)
    callbacks.callbacks.step_checkpoint.every_n_train_steps = 25
    built = step_triggered(callbacks)
    assert len(built) == 1 and built[0]._every_n_train_steps == 25 and built[0].save_last
    assert step_checkpoint(tmp_path, 0) is None


# --- training-step randomness and the non-finite loss log -------------------------------------------------

def test_step_seed_depends_on_seed_step_and_rank_only():
    module = module_for(tiny_plan())
    seeds = {}
    for step in (0, 1, 2):
        module._trainer = SimpleNamespace(global_step=step, global_rank=0)
        torch.rand(3)  # the global stream moves; the step's seed must not
        seeds[step] = module.step_seed()
        assert module.step_seed() == seeds[step]
    module._trainer = SimpleNamespace(global_step=1, global_rank=1)
    assert len({*seeds.values(), module.step_seed()}) == 4
    module._trainer = None


def test_skipped_nonfinite_loss_is_logged_with_case_names(caplog):
    module = module_for(tiny_plan(), "single_stage")
    terms = {"loss": torch.tensor(float("nan")), "seg": torch.tensor(1.0)}
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.training.module"):
        assert module._nonfinite_loss(terms, {"case_id": ["quiz_0_007", "quiz_2_011"]}, batch_idx=3) is None
    message = caplog.records[-1].getMessage()
    assert "quiz_0_007" in message and "quiz_2_011" in message
    assert "loss=nan" in message and "skipped" in message


# --- out of GPU memory during prediction ------------------------------------------------------------------

class RunsOutOfMemory(torch.nn.Module):
    """Pointwise, but the first ``failures`` forward passes (or those over more than ``max_windows``
    windows) raise torch's out-of-memory error, as a GPU would."""

    def __init__(self, failures: int = 0, max_windows: int | None = None):
        super().__init__()
        self.failures, self.max_windows, self.calls = failures, max_windows, []

    def forward(self, windows):
        self.calls.append(windows.shape[0])
        if self.failures > 0 or (self.max_windows is not None and windows.shape[0] > self.max_windows):
            self.failures -= 1
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return Pointwise()(windows)


def test_out_of_memory_halves_the_window_batch_then_moves_the_sums_to_the_cpu(caplog):
    image = torch.randn(1, 1, 13, 37, 30)
    windows = InferenceSettings.from_config({"overlap": 0.5, "mirror_axes": [], "sw_batch_size": 4})
    reference = predict_windows(Pointwise(), image, (8, 16, 16), windows)
    network = RunsOutOfMemory(failures=3)
    with caplog.at_level(logging.WARNING, logger="pancreas_mtl.inference.sliding_window"):
        result = predict_windows(network, image, (8, 16, 16), windows)
    assert network.calls[:4] == [4, 2, 1, 1] and set(network.calls[3:]) == {1}
    assert result.sw_batch_size == 1 and result.accumulated_on_cpu and not reference.accumulated_on_cpu
    torch.testing.assert_close(result.logits, reference.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.class_probabilities(), reference.class_probabilities())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and "retrying with 2" in warnings[0] and "retrying with 1" in warnings[1]
    assert "moving the whole-case sums to the CPU" in warnings[2]


def test_out_of_memory_with_nothing_left_to_give_is_an_error_with_advice():
    with pytest.raises(OutOfMemoryError, match=r"one \(8, 16, 16\) window per forward pass .*smaller"):
        predict_windows(RunsOutOfMemory(failures=10**6), torch.randn(1, 1, 8, 16, 16), (8, 16, 16),
                        InferenceSettings.from_config({"mirror_axes": [], "sw_batch_size": 2}))


def test_out_of_memory_while_adding_a_window_moves_the_sums_without_counting_it_twice(caplog):
    class FailsOnce:
        def __init__(self, tensor):
            self.tensor, self.failed = tensor, False

        def to(self, device):
            if not self.failed:
                self.failed = True
                raise OutOfMemoryError("CUDA out of memory (simulated)")
            return self.tensor.to(device)

    weights = torch.rand(4, 4, 4) + 0.1
    window = torch.randn(3, 4, 4, 4)
    plain = _Stitcher(3, (4, 8, 4), weights, torch.device("cpu"))
    flaky = _Stitcher(3, (4, 8, 4), weights, torch.device("cpu"))
    for stitcher, logits in ((plain, window), (flaky, FailsOnce(window))):
        stitcher.add(logits, (slice(0, 4), slice(2, 6), slice(0, 4)))
    assert flaky.on_cpu and not plain.on_cpu
    torch.testing.assert_close(flaky.logits_sum, plain.logits_sum, rtol=0, atol=0)
    torch.testing.assert_close(flaky.weight_sum, plain.weight_sum, rtol=0, atol=0)


def test_predictor_keeps_the_smaller_batch_and_export_falls_back(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "in"
    for number in (1, 2):
        image, _ = make_case_arrays(np.random.default_rng(number), shape_zyx=(10, 24, 28))
        write_nifti(image, lps_affine(), folder / f"quiz_{number:03d}_0000.nii.gz")
    network = RunsOutOfMemory(max_windows=1)
    windows = InferenceSettings.from_config({"overlap": 0.5, "mirror_axes": [], "sw_batch_size": 2})
    predictor = Predictor([network], tiny_plan(), windows, device="cpu")
    export_calls = []

    def export_out_of_memory_once(probabilities, *args):
        export_calls.append(probabilities.device)
        if len(export_calls) == 1:
            raise OutOfMemoryError("CUDA out of memory (simulated)")
        return restore(probabilities, *args)

    restore = runner.restore_original_geometry
    monkeypatch.setattr(runner, "restore_original_geometry", export_out_of_memory_once)
    cases, _ = find_cases(folder)
    with caplog.at_level(logging.WARNING):
        summary = predict_cases(predictor, cases, tmp_path / "out", progress=False, prefetch=False)
    assert summary.exit_code == 0 and summary.predicted == ["quiz_001", "quiz_002"]
    assert network.calls.count(2) == 1 and predictor.sw_batch_size == 1  # the second case never tried 2
    assert len(export_calls) == 3 and "resampling on the CPU" in caplog.text
    record = load_json(record_path(tmp_path / "out", "quiz_002"))
    assert record["sw_batch_size"] == 1


# --- fuzz: prediction always lands on the input's grid ----------------------------------------------------

@pytest.fixture(scope="module")
def random_network():
    torch.manual_seed(0)
    model_cfg = {"backbone": OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/resenc.yaml")),
                 "head": OmegaConf.to_container(OmegaConf.load(CONF / "model/head/single_stage.yaml"))}
    return build_model(model_cfg, tiny_plan()).eval()


def random_affine(spacing, permutation, flips, angle, origin) -> np.ndarray:
    """A voxel (x, y, z) -> mm affine: axes permuted and flipped, rotated about z, scaled by spacing."""
    directions = np.eye(3)[:, list(permutation)] * np.where(flips, -1.0, 1.0)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ directions * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


DTYPES = {"int16": (np.int16, -1000, 1000), "uint8": (np.uint8, 0, 255), "int32": (np.int32, -2000, 3000),
          "float32": (np.float32, -1000, 1000), "float64": (np.float64, -500, 500)}


@settings(max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(shape=st.tuples(st.integers(3, 16), st.integers(3, 24), st.integers(3, 24)),
       dtype=st.sampled_from(sorted(DTYPES)),
       spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
       permutation=st.permutations([0, 1, 2]),
       flips=st.tuples(*[st.booleans()] * 3),
       angle=st.floats(-math.pi, math.pi),
       origin=st.tuples(*[st.floats(-500, 500)] * 3),
       target_spacing=st.tuples(*[st.sampled_from([0.5, 1.0, 2.0, 4.0])] * 3),
       seed=st.integers(0, 2**16))
def test_prediction_lands_on_the_input_grid(random_network, shape, dtype, spacing, permutation, flips, angle,
                                            origin, target_spacing, seed):
    numpy_dtype, low, high = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    image = rng.uniform(low, high, shape).astype(numpy_dtype)
    image[0, 0, 0], image[-1, -1, -1] = low, high  # never constant
    affine = random_affine(spacing, permutation, flips, angle, origin)
    predictor = Predictor([random_network], tiny_plan(target_spacing),
                          InferenceSettings.from_config({"overlap": 0.25, "mirror_axes": []}), device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        path = write_nifti(image, affine, Path(folder) / "in" / "case_0000.nii.gz")
        cases, problems = find_cases(path)
        summary = predict_cases(predictor, cases, Path(folder) / "out", progress=False, prefetch=False)
        assert summary.exit_code == 0 and not problems, summary.failed
        source, written = nib.load(str(path)), nib.load(str(Path(folder) / "out" / "case.nii.gz"))
        assert written.shape == source.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        labels = read_volume(Path(folder) / "out" / "case.nii.gz").array
        assert labels.shape == shape and set(np.unique(labels)) <= {0, 1, 2}


# --- load: memory does not grow with the number of cases ---------------------------------------------------

@pytest.mark.slow
def test_prediction_memory_does_not_grow_with_the_number_of_cases(tmp_path):
    """Peak traced memory (numpy buffers and Python objects) over 32 cases stays that of 8 cases: nothing
    is kept per case. bench/prediction_memory.py measures the process's RSS over 20 and 200 cases."""
    import tracemalloc

    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    for number in range(32):
        image, _ = make_case_arrays(rng, shape_zyx=(10, 24, 28))
        write_nifti(image, lps_affine(), folder / f"quiz_{number:03d}_0000.nii.gz")
    cases, _ = find_cases(folder)
    predictor = Predictor([Pointwise()], tiny_plan(),
                          InferenceSettings.from_config({"overlap": 0.25, "mirror_axes": []}), device="cpu")
    predict_cases(predictor, cases[:2], tmp_path / "warm-up", progress=False)
    peaks = {}
    for count in (8, 32):
        tracemalloc.start()
        try:
            summary = predict_cases(predictor, cases[:count], tmp_path / f"out{count}", progress=False)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(summary.predicted) == count
    growth_per_case = (peaks[32] - peaks[8]) / 24
    assert growth_per_case < 16 * 1024, f"peak traced memory {peaks}: {growth_per_case / 1024:.1f} KiB/case"
