"""What prediction is given: input files that cannot be read are failed cases, never silently dropped;
settings are checked before the first case."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.sources import find_cases
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_broken_symbolic_link_is_a_failed_case(tmp_path, link):
    folder = tmp_path / "in"
    names = write_cases(folder, count=1)
    broken = folder / "case_0000.nii.gz"
    broken.symlink_to(folder / "gone.nii.gz" if link == "dangling" else broken)
    cases, problems = find_cases(folder)
    assert [case.case_id for case in cases] == names
    assert list(problems) == ["case"] and "is a symbolic link to" in problems["case"]

    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    summary = run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}"])
    assert summary.exit_code == 1 and list(summary.failed) == ["case"] and summary.predicted == names


def test_hidden_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "in"
    names = write_cases(folder, count=1)
    (folder / ".hidden_0000.nii.gz").write_bytes((folder / f"{names[0]}_0000.nii.gz").read_bytes())
    with caplog.at_level(logging.WARNING):
        cases, problems = find_cases(folder)
    assert [case.case_id for case in cases] == names and not problems
    assert "1 hidden image file(s) skipped: .hidden_0000.nii.gz" in caplog.text


def test_input_splits_on_a_plain_folder_is_refused(tmp_path):
    folder = tmp_path / "in"
    write_cases(folder, count=1)
    with pytest.raises(ValueError, match=rf"input_splits=\['validation'\] selects splits of a dataset root .*{folder}"):
        find_cases(folder, ["validation"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"sw_batch_size": 0}, r"sw_batch_size must be a whole number >= 1, got 0"),
    ({"mirror_axes": [5]}, r"mirror_axes must be spatial axes 0 \(z\), 1 \(y\), 2 \(x\) without repeats, got \[5\]"),
    ({"mirror_axes": [0, 0]}, r"without repeats, got \[0, 0\]"),
    ({"sigma_scale": 0}, r"sigma_scale must be > 0"),
    ({"roi_size": [8, 16]}, r"roi_size must be null or three window sizes \(z, y, x\) >= 1"),
    ({"min_lesion_volume": -1}, r"min_lesion_volume must be >= 0"),
    ({"coarse_margin_mm": -5}, r"coarse_margin_mm must be >= 0"),
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
])
def test_inference_settings_are_checked_before_any_case(changes, message):
    with pytest.raises(ValueError, match=message):
        InferenceSettings.from_config({"name": "test", **changes})


def test_predict_refuses_bad_settings_before_writing_anything(tmp_path):
    folder = tmp_path / "in"
    write_cases(folder, count=1)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    with pytest.raises(ValueError, match="mirror_axes"):
        run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}", "inference.mirror_axes=[5]"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="num_threads must be null or a whole number >= 1"):
        run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}", "num_threads=0"])


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 5, 5), (2, 2, 2)])
def test_fastest_on_an_image_smaller_than_the_coarse_network_needs(tmp_path, shape):
    """The coarse pass averages the image down; where that leaves the deepest stage a single voxel (or the
    case fits one window anyway) it is skipped, not an InstanceNorm "when training" error."""
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    predictor = Predictor.from_checkpoints(checkpoint, InferenceSettings.from_config(
        {"name": "fastest", "coarse_to_fine": True, "overlap": 0.25}), device="cpu")
    prediction = predictor.predict_preprocessed(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32))
    assert tuple(prediction.probabilities.shape) == (3, *shape)
    assert prediction.info == {"coarse_skipped": "the case is too small for a coarse pass"}


def test_prediction_applies_the_configured_input_limits(tmp_path):
    folder = tmp_path / "in"
    names = write_cases(folder, count=1)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}"]
    summary = run_predict([*args, "limits.max_spacing_mm=1.0"])  # the cases have 2 mm slices
    assert summary.exit_code == 1 and list(summary.failed) == names
    assert "spacing" in summary.failed[names[0]] and "1" in summary.failed[names[0]]
    summary = run_predict([*args, "limits.max_resampled_voxels=100"])
    assert list(summary.failed) == names and "max_resampled_voxels" in summary.failed[names[0]]
