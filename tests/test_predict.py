"""The predictor: window stitching, mirroring, subtype aggregation, coarse-to-fine, the way back to the input's
grid (LPS and RAS, anisotropic resampling), output files, reruns, failures and ensembles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from pancreas_mtl.data.io import read_volume, write_nifti
from pancreas_mtl.evaluation.metrics import lesion_dice, whole_pancreas_dice
from pancreas_mtl.inference.checkpoint import load_network
from pancreas_mtl.inference.postprocessing import keep_largest_components
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.runner import predict_cases
from pancreas_mtl.inference.sliding_window import (
    gaussian_importance_map,
    lesion_volumes,
    predict_windows,
    sliding_window_predict,
    window_starts,
)
from pancreas_mtl.inference.sources import find_cases
from pancreas_mtl.models.multitask import build_model
from pancreas_mtl.planning.plan import ChannelNormalization, Plan
from tests.conftest import REPO_ROOT, SHARED_CT, lps_affine, make_case_arrays

CONF = REPO_ROOT / "conf"



# --- helpers ------------------------------------------------------------------------------------------

def tiny_plan(target_spacing=(2.0, 0.8, 0.8), patch=(8, 16, 16), **changes) -> Plan:
    """A two-stage plan (divisor 2) with CT normalisation: clip [-100, 200] HU, mean 50, std 50."""
    values = dict(preset="tiny-test", target_spacing=tuple(target_spacing), median_shape=(12, 28, 36),
                  patch_size=tuple(patch), batch_size=2,
                  normalization=[ChannelNormalization("ct", -100.0, 200.0, 50.0, 50.0)],
                  kernel_sizes=[(3, 3, 3), (3, 3, 3)], strides=[(1, 1, 1), (2, 2, 2)], features_per_stage=[4, 8],
                  n_blocks_per_stage=[1, 1], n_conv_per_stage_decoder=[1])
    values.update(changes)
    return Plan(**values)


def save_checkpoint(path: Path, plan: Plan, seed: int = 0, seg_bias=None, class_bias=None) -> Path:
    """A training-checkpoint-shaped file for a tiny MultiTaskNet; with ``seg_bias`` / ``class_bias`` the
    segmentation / class logits are those constants everywhere (weights of the last layers zeroed)."""
    torch.manual_seed(seed)
    model_cfg = {"backbone": OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/resenc.yaml")),
                 "head": OmegaConf.to_container(OmegaConf.load(CONF / "model/head/single_stage.yaml"))}
    network = build_model(model_cfg, plan)
    with torch.no_grad():
        if seg_bias is not None:
            for head in network.backbone.seg_heads:
                head.weight.zero_()
                head.bias.copy_(torch.tensor(seg_bias))
        if class_bias is not None:
            network.head.classifier[-1].weight.zero_()
            network.head.classifier[-1].bias.copy_(torch.tensor(class_bias))
    torch.save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
                "pancreas_mtl": {"plan": plan.to_dict(), "config": {"model": model_cfg}}}, path)
    return path


class Pointwise(nn.Module):
    """A stub network that labels by intensity, voxel by voxel: logits (0, x, 2x - 2) of the normalised
    image x, so pancreas where 0 < x <= 2 (50 < HU <= 150) and lesion where x > 2 (HU > 150); class
    probabilities from the window's mean. It commutes with flips and with any tiling."""

    def forward(self, windows):
        x = windows[:, :1]
        seg = torch.cat([torch.zeros_like(x), x, 2 * x - 2], dim=1)
        mean = windows.mean(dim=(1, 2, 3, 4))
        return seg, torch.stack([mean, -mean, torch.zeros_like(mean)], dim=1).softmax(dim=1)


def expected_labels(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > 150, 2, np.where(hu > 50, 1, 0)).astype(np.uint8)


def boxes_image(shape=(20, 40, 48), border=2) -> np.ndarray:
    """int16 HU: -100 background, a 100 HU box off the centre with a 180 HU box inside it (a flipped or
    transposed axis would move them), and zero slabs at the low z and x borders (cropped off)."""
    hu = np.full(shape, -100, dtype=np.int16)
    z, y, x = shape
    hu[z // 5:3 * z // 5, y // 6:y // 2, x // 4:2 * x // 3] = 100
    hu[z // 4:z // 2, y // 4:5 * y // 12, x // 3:x // 2] = 180
    hu[:, :, :border] = 0
    hu[:border] = 0
    return hu


def ras_example(folder: Path, content: np.ndarray | None = None) -> Path:
    """The real RAS CT (3 mm) with zeroed slabs at the high x and z borders (so cropping matters), its
    header and affine kept; ``content`` (Z, Y, X) replaces the voxels."""
    source = nib.load(str(SHARED_CT / "example_ct_sm.nii.gz"))
    data = np.asanyarray(source.dataobj).copy() if content is None else content.transpose(2, 1, 0).copy()
    data[-3:] = 0        # x
    data[:, :, -2:] = 0  # z
    path = folder / "example_ct_sm.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, source.affine, source.header), str(path))
    return path


def settings(**changes) -> InferenceSettings:
    return InferenceSettings.from_config({"name": "test", "overlap": 0.25, **changes})


# --- windows --------------------------------------------------------------------------------------------

def test_window_starts_and_gaussian():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(4, 8, 0.5) == [0] and window_starts(16, 16, 0.5) == [0]
    assert window_starts(20, 8, 0.75) == [0, 6, 12]
    weights = gaussian_importance_map((8, 12, 16), 0.125)
    assert weights.shape == (8, 12, 16) and float(weights.max()) == pytest.approx(1.0) and float(weights.min()) > 0
    for dim in range(3):
        torch.testing.assert_close(weights, weights.flip(dim))


@pytest.mark.parametrize("shape, overlap", [((13, 37, 30), 0.5), ((13, 37, 30), 0.0), ((5, 11, 40), 0.25)])
def test_pointwise_model_is_stitched_exactly(shape, overlap):
    """Gaussian weights normalise out: a voxel-wise model gives its own output everywhere, padding included."""
    image = torch.randn(1, 1, *shape)
    logits, probabilities = sliding_window_predict(Pointwise(), image, (8, 16, 16), sw_batch_size=3, overlap=overlap)
    expected, _ = Pointwise()(image)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert probabilities.shape == (3,) and float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)


def test_constant_network_gives_constant_logits(tmp_path):
    network, _, _ = load_network(save_checkpoint(tmp_path / "c.ckpt", tiny_plan(), seg_bias=[0.5, 2.0, -1.0],
                                                 class_bias=[0.0, 1.0, 0.0]))
    logits, probabilities = sliding_window_predict(network, torch.randn(1, 1, 11, 30, 21), (8, 16, 16))
    torch.testing.assert_close(logits, torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 11, 30, 21))
    torch.testing.assert_close(probabilities, torch.tensor([0.0, 1.0, 0.0]).softmax(0))


def test_mirroring_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():  # a kernel equal to its flip along every axis: the conv commutes with flips
        kernel = conv.weight.clone()
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        conv.weight.copy_(sum(kernel.flip(dims) for dims in flips) / 8)

    class Symmetric(nn.Module):
        def forward(self, windows):
            seg = conv(windows)
            return seg, seg.mean(dim=(2, 3, 4)).softmax(dim=1)

    image = torch.randn(1, 1, 12, 20, 22)
    plain = predict_windows(Symmetric(), image, (8, 16, 16), overlap=0.5)
    mirrored = predict_windows(Symmetric(), image, (8, 16, 16), overlap=0.5, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirrored.class_probabilities(), plain.class_probabilities(), atol=1e-6, rtol=1e-6)
    # a model that is not symmetric does change under mirroring
    asymmetric = nn.Conv3d(1, 3, 3, padding=1)
    wrapped = lambda w: (asymmetric(w), None)  # noqa: E731
    with torch.no_grad():
        assert not torch.allclose(sliding_window_predict(wrapped, image, (8, 16, 16))[0],
                                  sliding_window_predict(wrapped, image, (8, 16, 16), mirror_axes=(2,))[0])


def test_subtype_follows_the_windows_that_hold_the_lesion():
    """Hand-made windows: only windows over the bright blob predict lesion, and only their vote counts."""
    class BlobVoter(nn.Module):
        def forward(self, windows):
            x = windows[:, :1]
            seg = torch.cat([torch.zeros_like(x), torch.full_like(x, -5.0), 10 * x - 5], dim=1)
            has_blob = (x > 0.5).flatten(1).any(1).float()
            return seg, torch.stack([1 - has_blob, has_blob, torch.zeros_like(has_blob)], dim=1)

    image = torch.zeros(1, 1, 8, 16, 64)
    image[..., 2:5, 3:9, 50:58] = 1.0
    prediction = predict_windows(BlobVoter(), image, (8, 16, 16), overlap=0.0)
    assert prediction.num_windows == 4
    torch.testing.assert_close(prediction.lesion_volumes[:3], torch.zeros(3))
    assert float(prediction.lesion_volumes[3]) == pytest.approx(3 * 6 * 8, rel=1e-2)  # softmax 0.993
    torch.testing.assert_close(prediction.class_probabilities(), torch.tensor([0.0, 1.0, 0.0]))
    # no lesion anywhere: every window votes with the same weight
    empty = predict_windows(BlobVoter(), torch.zeros(1, 1, 8, 16, 64), (8, 16, 16), overlap=0.0)
    torch.testing.assert_close(empty.class_probabilities(), torch.tensor([1.0, 0.0, 0.0]))
    logits = torch.zeros(2, 3, 2, 2, 2)
    logits[0, 2, 0, 0, 0] = 10.0
    torch.testing.assert_close(lesion_volumes(logits), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)


def test_coarse_to_fine_restricts_the_windows_to_the_organ():
    plan = tiny_plan(target_spacing=(1.0, 1.0, 1.0))
    image = torch.full((1, 24, 48, 64), -1.0)
    image[:, 8:14, 20:30, 40:52] = 1.0
    full = Predictor([Pointwise()], plan, settings(), device="cpu").predict_preprocessed(image)
    fastest = Predictor([Pointwise()], plan, settings(coarse_to_fine=True, coarse_margin_mm=4, shrink_window=True),
                        device="cpu").predict_preprocessed(image)
    assert fastest.info["coarse_found"] and fastest.box != ((0, 24), (0, 48), (0, 64))
    (z0, z1), (y0, y1), (x0, x1) = fastest.box
    assert z0 <= 8 - 4 and z1 >= 14 + 4 and y0 <= 16 and y1 >= 34 and x0 <= 36 and x1 >= 56
    assert fastest.windows < full.windows
    torch.testing.assert_close(fastest.probabilities.argmax(0), full.probabilities.argmax(0))
    # a box smaller than the window grows to one window of real image (not zero padding)
    tight = Predictor([Pointwise()], plan, settings(coarse_to_fine=True, coarse_margin_mm=0), device="cpu")
    box = tight.predict_preprocessed(image).box
    assert [stop - start for start, stop in box] == [max(8, 6), 16, 16] and box[1][0] <= 20 and box[1][1] >= 30
    # nothing found: the whole case
    nothing = Predictor([Pointwise()], plan, settings(coarse_to_fine=True), device="cpu").predict_preprocessed(
        torch.full((1, 16, 32, 32), -1.0))
    assert not nothing.info["coarse_found"] and nothing.box == ((0, 16), (0, 32), (0, 32))


def test_keep_largest_components():
    labels = np.zeros((6, 10, 10), dtype=np.uint8)
    labels[1:4, 1:6, 1:6] = 1
    labels[2, 2:4, 2:4] = 2
    labels[2, 5, 5] = 2          # a second lesion, touching the gland
    labels[5, 8:10, 8:10] = 1    # a stray island
    cleaned = keep_largest_components(labels)
    assert cleaned[5].sum() == 0 and cleaned[2, 5, 5] == 1 and (cleaned == 2).sum() == 4
    assert (cleaned > 0).sum() == (labels[:5] > 0).sum()
    np.testing.assert_array_equal(keep_largest_components(labels, pancreas=False, lesion=False), labels)


# --- back to the input's grid ---------------------------------------------------------------------------

@pytest.mark.parametrize("orientation, target_spacing", [("lps", (4.0, 1.0, 1.2)), ("lps", (2.0, 0.8, 0.8)),
                                                         ("ras", (2.5, 3.4, 2.6))])
def test_round_trip_geometry(orientation, target_spacing, tmp_path):
    """Shape, affine and header come back; a voxel-wise model's labels land where the intensities are,
    through anisotropic resampling (a separate z axis in the first case) and the crop."""
    if orientation == "lps":
        hu = boxes_image()
        path = write_nifti(hu, lps_affine((2.0, 0.8, 0.8)), tmp_path / "in" / "quiz_001_0000.nii.gz")
    else:
        path = ras_example(tmp_path / "in", boxes_image(shape=(30, 101, 122), border=0))
        hu = read_volume(path).array
    cases, problems = find_cases(path)
    assert not problems
    predictor = Predictor([Pointwise()], tiny_plan(target_spacing), settings(roi_size=(16, 32, 32)), device="cpu")
    summary = predict_cases(predictor, cases, tmp_path / "out", progress=False)
    assert summary.exit_code == 0
    source, written = nib.load(str(path)), nib.load(str(tmp_path / "out" / f"{cases[0].case_id}.nii.gz"))
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    labels = read_volume(tmp_path / "out" / f"{cases[0].case_id}.nii.gz").array
    expected = expected_labels(hu)
    assert whole_pancreas_dice(labels, expected) > 0.9 and lesion_dice(labels, expected) > 0.8
    assert labels[hu == 0].max() == 0  # outside the crop: background


@pytest.mark.parametrize("orientation", ["lps", "ras"])
def test_constant_network_fills_exactly_the_crop(orientation, tmp_path):
    if orientation == "lps":
        hu = boxes_image(shape=(14, 30, 34), border=3)
        path = write_nifti(hu, lps_affine((2.0, 0.8, 0.8)), tmp_path / "in" / "quiz_002_0000.nii.gz")
    else:
        path = ras_example(tmp_path / "in")
        hu = read_volume(path).array
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan((3.1, 1.3, 0.9) if orientation == "lps"
                                                                else (2.0, 4.0, 5.0)), seg_bias=[0.0, 3.0, 1.0])
    predictor = Predictor.from_checkpoints(checkpoint, settings(roi_size=(16, 32, 32)), device="cpu")
    cases, _ = find_cases(path)
    predict_cases(predictor, cases, tmp_path / "out", progress=False, save_probabilities=True)
    labels = read_volume(tmp_path / "out" / f"{cases[0].case_id}.nii.gz").array
    nonzero = hu != 0
    inside = np.zeros_like(nonzero)
    inside[tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(nonzero))] = True
    np.testing.assert_array_equal(labels, inside.astype(np.uint8))
    saved = np.load(tmp_path / "out" / f"{cases[0].case_id}.npz")
    assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (3, *hu.shape)
    np.testing.assert_allclose(saved["probabilities"][:, inside].astype(float).mean(1),
                               torch.tensor([0.0, 3.0, 1.0]).softmax(0).numpy(), atol=1e-3)
    assert np.all(saved["probabilities"][0][~inside] == 1)


# --- the command: outputs, reruns, failures, ensembles ----------------------------------------------------

def write_cases(folder: Path, count: int = 3, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for number in range(1, count + 1):
        image, mask = make_case_arrays(rng, shape_zyx=(10, 24, 28))
        write_nifti(image, lps_affine(), folder / f"quiz_{number:03d}_0000.nii.gz")
        write_nifti(mask, lps_affine(), folder / f"quiz_{number:03d}.nii.gz")  # masks beside images are ignored
        names.append(f"quiz_{number:03d}")
    return names


def compose_predict(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("predict", overrides=["progress=false", "device=cpu", "prefetch=true", *overrides])


def run_predict(overrides: list[str]):
    from predict import predict

    return predict(compose_predict(overrides))


def test_outputs_reruns_overwrite_and_a_corrupt_case(tmp_path):
    folder = tmp_path / "test"
    names = write_cases(folder)
    (folder / "quiz_004_0000.nii.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan(), seg_bias=[0.0, 2.0, 1.0],
                                 class_bias=[0.0, 0.0, 3.0])
    out = tmp_path / "pred"
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={out}", "inference=fast"]

    summary = run_predict(args)
    assert summary.exit_code == 1 and list(summary.failed) == ["quiz_004"] and "quiz_004" in str(summary.failed)
    assert sorted(summary.predicted) == names
    assert (out / "subtype_results.csv").read_text() == "Names,Subtype\n" + "".join(f"{n}.nii.gz,2\n" for n in names)
    probability_lines = (out / "subtype_probabilities.csv").read_text().splitlines()
    assert probability_lines[0] == "Names,p0,p1,p2" and len(probability_lines) == 4
    p = torch.tensor([0.0, 0.0, 3.0]).softmax(0).tolist()
    assert probability_lines[1] == f"quiz_001.nii.gz,{p[0]:.6f},{p[1]:.6f},{p[2]:.6f}"
    timings_header = "case_id,load_s,preprocess_s,network_s,export_s,write_s,total_s,windows,shape_zyx"
    assert (out / "timings.csv").read_text().splitlines()[0] == timings_header
    mtimes = {n: (out / f"{n}.nii.gz").stat().st_mtime_ns for n in names}

    # a rerun skips finished cases; a run killed after writing a mask but before its record redoes that case
    (out / ".records" / "quiz_002.json").unlink()
    summary = run_predict(args)
    assert summary.skipped == ["quiz_001", "quiz_003"] and summary.predicted == ["quiz_002"]
    assert all((out / f"{n}.nii.gz").stat().st_mtime_ns == mtimes[n] for n in ("quiz_001", "quiz_003"))
    assert (out / "subtype_results.csv").read_text().count("quiz_002") == 1
    assert len((out / "subtype_results.csv").read_text().splitlines()) == 4
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    summary = run_predict([*args, "overwrite=true"])
    assert sorted(summary.predicted) == names and not summary.skipped
    assert all((out / f"{n}.nii.gz").stat().st_mtime_ns > mtimes[n] for n in ("quiz_001", "quiz_003"))


def test_ensemble_of_identical_checkpoints_equals_one(tmp_path):
    folder = tmp_path / "test"
    write_cases(folder, count=1)
    plan = tiny_plan()
    first = save_checkpoint(tmp_path / "a.ckpt", plan, seed=3)
    second = save_checkpoint(tmp_path / "b.ckpt", plan, seed=3)
    common = [f"input={folder}", "save_probabilities=true", "inference=fastest"]
    run_predict([f"ckpt={first}", f"output={tmp_path / 'one'}", *common])
    run_predict([f"ckpt=[{first},{second}]", f"output={tmp_path / 'two'}", *common])
    one, two = np.load(tmp_path / "one" / "quiz_001.npz"), np.load(tmp_path / "two" / "quiz_001.npz")
    np.testing.assert_allclose(one["probabilities"].astype(float), two["probabilities"].astype(float), atol=2e-3)
    np.testing.assert_allclose(one["subtype_probabilities"], two["subtype_probabilities"], atol=1e-6)
    assert (tmp_path / "one" / "subtype_probabilities.csv").read_text() == \
        (tmp_path / "two" / "subtype_probabilities.csv").read_text()

    other = save_checkpoint(tmp_path / "c.ckpt", tiny_plan(target_spacing=(3.0, 0.8, 0.8)))
    with pytest.raises(ValueError, match="target_spacing"):
        Predictor.from_checkpoints([first, other], device="cpu")


def test_presets_compose_into_settings():
    presets = sorted(p.stem for p in (CONF / "inference").glob("*.yaml"))
    assert presets == ["accurate", "fast", "fastest", "nnunet"]
    loaded = {name: InferenceSettings.from_config(OmegaConf.to_container(compose_predict(
        ["ckpt=x", "input=y", "output=z", f"inference={name}"]).inference)) for name in presets}
    assert loaded["accurate"].overlap == 0.5 and loaded["accurate"].mirror_axes == (0, 1, 2)
    assert loaded["fast"].mirror_axes == () and loaded["fast"].overlap < 0.5 and not loaded["fast"].coarse_to_fine
    assert loaded["fastest"].coarse_to_fine and loaded["fastest"].coarse_factor == (2.0, 2.0, 2.0)
    assert loaded["nnunet"].nnunet_compat and not any(loaded[p].nnunet_compat for p in presets[:3])
    assert compose_predict(["ckpt=x", "input=y", "output=z"]).inference.name == "fast"  # the default
    with pytest.raises(ValueError, match="unknown inference setting"):
        InferenceSettings.from_config({"overlapp": 0.5})


def test_input_sources(tmp_path):
    """A split folder with subtype subfolders and masks, multi-channel files, single files, and broken cases."""
    root = tmp_path / "validation"
    image, mask = make_case_arrays(np.random.default_rng(0), shape_zyx=(6, 8, 8))
    for subtype, case in ((0, "quiz_0_001"), (2, "quiz_2_002")):
        write_nifti(image, lps_affine(), root / f"subtype{subtype}" / f"{case}_0000.nii.gz")
        write_nifti(mask, lps_affine(), root / f"subtype{subtype}" / f"{case}.nii.gz")
    cases, problems = find_cases(root)
    assert [c.case_id for c in cases] == ["quiz_0_001", "quiz_2_002"] and not problems

    multi = tmp_path / "multi"
    for channel in (0, 1):
        write_nifti(image, lps_affine(), multi / f"two_{channel:04d}.nii.gz")
    write_nifti(image, lps_affine(), multi / "gap_0001.nii.gz")
    cases, problems = find_cases(multi)
    assert [(c.case_id, len(c.image_paths)) for c in cases] == [("two", 2)]
    assert "0000" in problems["gap"]
    cases, problems = find_cases([multi / "two_0000.nii.gz", SHARED_CT / "example_ct_sm.nii.gz"])
    assert [c.case_id for c in cases] == ["example_ct_sm", "two"]
    with pytest.raises(FileNotFoundError):
        find_cases(tmp_path / "missing")


@pytest.mark.slow
def test_command_line_exit_code(tmp_path):
    folder = tmp_path / "test"
    write_cases(folder, count=1)
    (folder / "quiz_009_0000.nii.gz").write_bytes(b"")
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    env = {**os.environ, "PANCREAS_MTL_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), f"ckpt={checkpoint}", f"input={folder}",
                             f"output={tmp_path / 'pred'}", "progress=false", "num_threads=1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "quiz_009" in result.stderr + result.stdout and "empty" in result.stderr + result.stdout
    assert (tmp_path / "pred" / "quiz_001.nii.gz").is_file()
    assert (tmp_path / "pred" / "subtype_results.csv").read_text().startswith("Names,Subtype\nquiz_001.nii.gz,")
