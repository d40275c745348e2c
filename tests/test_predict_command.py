"""predict.py as a command: output files, reruns, a corrupt case, ensembles, presets, input sources and
the exit code."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor
from pancreas_mtl.inference.sources import find_cases
from tests.conftest import REPO_ROOT, SHARED_CT, lps_affine, make_case_arrays
from tests.predict_helpers import CONF, compose_predict, run_predict, save_checkpoint, tiny_plan, write_cases

# --- the command: outputs, reruns, failures, ensembles ----------------------------------------------------

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
    (out / ".records" / "quiz_002.json").write_text('{"case_id": "quiz_002", "status": "writing", '
                                                     '"mask": "quiz_002.nii.gz", "files": ["quiz_002.nii.gz"]}')
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
    assert presets == ["accurate", "fast", "fastest", "nnunet", "validation"]
    composed = {name: OmegaConf.to_container(compose_predict(["ckpt=x", "input=y", "output=z",
                                                               f"inference={name}"]).inference) for name in presets}
    schema = [field.name for field in fields(InferenceSettings)]
    for name, config in composed.items():  # every preset composes to every key, nothing else
        assert sorted(config) == sorted(schema) and config["name"] == name, name
    loaded = {name: InferenceSettings.from_config(config) for name, config in composed.items()}
    for name in presets:  # InferenceSettings.preset reads a file's defaults list as Hydra composes it
        assert InferenceSettings.preset(name) == loaded[name], name
    assert loaded["accurate"].overlap == 0.5 and loaded["accurate"].mirror_axes == (0, 1, 2)
    assert loaded["fast"].mirror_axes == () and loaded["fast"].overlap < 0.5 and not loaded["fast"].coarse_to_fine
    assert loaded["fastest"].coarse_to_fine and loaded["fastest"].coarse_factor == (2.0, 2.0, 2.0)
    assert loaded["nnunet"].nnunet_compat and not any(loaded[p].nnunet_compat for p in presets if p != "nnunet")
    assert loaded["validation"].overlap == 0.5 and loaded["validation"].mirror_axes == ()
    assert compose_predict(["ckpt=x", "input=y", "output=z"]).inference.name == "fast"  # the default
    with pytest.raises(ValueError, match="unknown inference setting"):
        InferenceSettings.from_config({"overlapp": 0.5})


def test_accurate_is_the_one_full_list_and_the_other_presets_list_what_differs():
    """accurate.yaml lists every key, in the schema's order, and the schema holds no values (a partial
    mapping is accurate with those keys changed); every other preset starts from accurate and lists only
    the keys whose values differ from it, plus its name."""
    accurate = OmegaConf.to_container(OmegaConf.load(CONF / "inference/accurate.yaml"))
    assert list(accurate) == [field.name for field in fields(InferenceSettings)]
    assert InferenceSettings.from_config({"sw_batch_size": 3}) == dataclasses.replace(
        InferenceSettings.from_config(accurate), sw_batch_size=3)
    for path in sorted((CONF / "inference").glob("*.yaml")):
        if path.stem == "accurate":
            continue
        listed = OmegaConf.to_container(OmegaConf.load(path))
        assert listed.pop("defaults") == ["accurate", "_self_"], path.name
        assert listed.pop("name") == path.stem, path.name
        same = sorted(key for key, value in listed.items() if value == accurate[key])
        assert listed and not same, f"{path.name} repeats accurate's {same}"


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


def test_no_cpu_engine_runs_in_the_pytest_worker():
    """tests/forked.py: outside tests marked engines, engine auto predicts with torch in-process."""
    from pancreas_mtl.inference import engines, model_folder

    for module in (engines, model_folder):
        with pytest.raises(ImportError, match="kept out of the pytest worker"):
            module.import_engine("openvino")
    assert engines.resolve_engine("auto", torch.device("cpu")) == "torch"
