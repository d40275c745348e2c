"""Window counts stay bounded: unique starts a voxel apart at any overlap, the per-case cap
(inference.max_windows_per_case) and its error, and the window progress bar on long cases."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.inference.predictor import Predictor
from pancreas_mtl.inference.settings import InferenceSettings
from pancreas_mtl.inference.sliding_window import predict_windows
from pancreas_mtl.inference.windows import TooManyWindowsError, window_starts
from tests.predict_helpers import (
    CONF,
    Pointwise,
    compose_predict,
    run_predict,
    save_checkpoint,
    settings,
    tiny_plan,
    write_cases,
)


class CountingPointwise(Pointwise):
    """:class:`Pointwise` that counts the windows it is given."""

    def __init__(self):
        super().__init__()
        self.windows_seen = 0

    def forward(self, windows):
        self.windows_seen += windows.shape[0]
        return super().forward(windows)


# --- window starts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, window", [(42, 8), (76, 16), (92, 16), (10, 4), (13, 12), (200, 7)])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9, 0.999, 0.999999])
def test_starts_are_unique_a_voxel_apart_and_cover_the_axis(size, window, overlap):
    starts = window_starts(size, window, 1.0 - overlap)
    steps = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] == size - window
    assert len(set(starts)) == len(starts) and min(steps) >= 1      # unique, at least one voxel apart
    assert max(steps) <= max(1, math.ceil(window * (1.0 - overlap)))  # never a step larger than asked
    assert len(starts) <= size - window + 1


def test_starts_at_overlap_near_one_are_every_voxel():
    assert window_starts(42, 8, 0.001) == list(range(35))
    assert window_starts(10, 4, 1e-9) == list(range(7))


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.999])
def test_a_window_as_large_as_the_axis_or_larger_is_one_start(overlap):
    assert window_starts(16, 16, 1.0 - overlap) == [0]
    assert window_starts(4, 8, 1.0 - overlap) == [0]


def test_ordinary_overlaps_are_unchanged():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(20, 8, 0.75) == [0, 6, 12]
    assert window_starts(20, 8, 1.0) == [0, 6, 12]


@pytest.mark.parametrize("roi", [(8, 16, 64), (12, 32, 32), (20, 24, 24)])
def test_the_issues_case_has_a_bounded_number_of_windows(roi):
    """42 x 76 x 92 at overlap 0.999: 6.5e9 to 7e9 windows with these rois before, now at most one per voxel
    position of the window."""
    shape = (42, 76, 92)
    count = math.prod(len(window_starts(size, window, 0.001)) for size, window in zip(shape, roi))
    assert count == math.prod(size - window + 1 for size, window in zip(shape, roi))
    assert count < 100_000


# --- the cap ----------------------------------------------------------------------------------------------

def test_too_many_windows_is_an_error_naming_case_count_and_setting():
    network = CountingPointwise()
    predictor = Predictor([network], tiny_plan(), settings(overlap=0.999, max_windows_per_case=1000), device="cpu")
    image = torch.randn(1, 20, 40, 48)  # (C, Z, Y, X); patch (8, 16, 16): 13 x 25 x 33 starts a voxel apart
    with pytest.raises(TooManyWindowsError) as raised:
        predictor.predict_preprocessed(image, case_id="quiz_042")
    message = str(raised.value)
    assert "quiz_042" in message and "10725 windows" in message and "max_windows_per_case" in message
    assert "1000" in message and "overlap" in message
    assert network.windows_seen == 0  # refused before the first window, not after hours

    # a smaller case under the cap runs; without a case id the message still names the count and setting
    assert predictor.predict_preprocessed(torch.randn(1, 8, 16, 20)).windows == 5
    with pytest.raises(TooManyWindowsError, match=r"10725 windows.*max_windows_per_case"):
        predict_windows(network, image[None], (8, 16, 16), settings(overlap=0.999, max_windows_per_case=1000))


def test_predict_fails_the_case_over_the_cap_and_goes_on(tmp_path):
    folder = tmp_path / "test"
    write_cases(folder, count=1)
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    summary = run_predict([f"ckpt={checkpoint}", f"input={folder}", f"output={tmp_path / 'pred'}",
                           "inference.overlap=0.999", "inference.max_windows_per_case=20"])
    assert summary.exit_code == 1 and list(summary.failed) == ["quiz_001"]
    assert re.search(r"TooManyWindowsError: .*\d+ windows .*max_windows_per_case=20", summary.failed["quiz_001"])
    assert not (tmp_path / "pred" / "quiz_001.nii.gz").exists()


def test_the_cap_is_a_checked_setting_in_every_preset_and_in_training_validation():
    """accurate.yaml holds the default; the other presets start from it (test_predict_command.py checks that
    every preset composes to every key)."""
    default = InferenceSettings.preset("accurate").max_windows_per_case
    assert OmegaConf.load(CONF / "inference/accurate.yaml").max_windows_per_case == default
    composed = compose_predict(["ckpt=x", "input=y", "output=z", "inference=fastest"]).inference
    assert InferenceSettings.from_config(OmegaConf.to_container(composed)).max_windows_per_case == default
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_windows_per_case"):
            InferenceSettings.from_config({"max_windows_per_case": bad})
    # training validation (conf/module/default.yaml) composes the validation preset: the cap is there
    from tests.test_module import compose_module

    validation = compose_module("module.validation.max_windows_per_case=7").validation
    assert InferenceSettings.from_config(OmegaConf.to_container(validation)).max_windows_per_case == 7


def test_training_validation_refuses_too_many_windows_naming_the_case():
    from pancreas_mtl.training.module import build_module
    from tests.test_module import run_config

    module = build_module(run_config("module.validation.overlap=0.999", "module.validation.max_windows_per_case=50"),
                          tiny_plan(), [1, 1, 1])
    module.eval()
    batch = {"image": torch.randn(1, 1, 20, 40, 48), "label": torch.zeros(1, 1, 20, 40, 48, dtype=torch.uint8),
             "case_id": ["synth_017"], "subtype": torch.tensor([0])}
    with pytest.raises(TooManyWindowsError, match=r"case synth_017: 10725 windows.*max_windows_per_case=50"):
        module.validation_step(batch, 0)


def test_the_default_cap_never_refuses_a_whole_abdomen_ct():
    """600 x 512 x 512 voxels at target spacing, accurate (overlap 0.5), with the quiz plan's patch and the
    small synthetic plan's: well under the default cap."""
    cap = InferenceSettings.preset("accurate").max_windows_per_case
    shape = (600, 512, 512)
    for patch in ((64, 128, 192), (32, 80, 112), (24, 56, 80)):
        count = math.prod(len(window_starts(size, window, 0.5)) for size, window in zip(shape, patch))
        assert count * 5 < cap, patch


def test_the_cap_does_not_change_an_output_folders_identity():
    """It decides no voxel: raising it must not make a finished folder look like another model's."""
    low = Predictor([Pointwise()], tiny_plan(), settings(max_windows_per_case=10), device="cpu")
    high = Predictor([Pointwise()], tiny_plan(), settings(max_windows_per_case=10**6), device="cpu")
    assert low.identity() == high.identity()


# --- the progress bar -------------------------------------------------------------------------------------

def test_a_long_case_shows_a_window_bar(capsys):
    long_case = torch.randn(1, 20, 40, 48)  # patch (8, 16, 16) at overlap 0.5: 4 x 4 x 5 = 80 windows
    predictor = Predictor([Pointwise()], tiny_plan(), settings(overlap=0.5, sw_batch_size=8), device="cpu",
                          progress=True)
    prediction = predictor.predict_preprocessed(long_case, case_id="quiz_007")
    assert prediction.windows > 64
    err = capsys.readouterr().err
    assert "quiz_007" in err and "window" in err and f"/{prediction.windows}" in err

    # a short case, or progress off, shows none
    assert predictor.predict_preprocessed(torch.randn(1, 8, 16, 16), case_id="quiz_008").windows == 1
    quiet = Predictor([Pointwise()], tiny_plan(), settings(overlap=0.5, sw_batch_size=8), device="cpu")
    quiet.predict_preprocessed(long_case, case_id="quiz_009")
    err = capsys.readouterr().err
    assert "quiz_008" not in err and "quiz_009" not in err
