"""Faults a long unattended run meets (docs/reliability.md): training killed mid-epoch and resumed, two
identical seeded runs, prediction killed mid-folder and rerun, two processes filling one cache."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.dataset.cache import build_cache, cached_entry, dataset_cache_root
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.inference.output_folder import finished_records
from pancreas_mtl.planning.planner import load_preset
from tests.conftest import REPO_ROOT, lps_affine, make_case_arrays, write_distributed_dataset
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan
from tests.test_experiments import compose_train

# Tolerance of the resumed run against the uninterrupted one, on CPU in float32 with one thread: the
# resumed run repeats the same arithmetic (same patches, dropout masks, optimizer and lr state), so
# weights and metrics agree to float32 rounding.
RESUME_ATOL = 1e-6
STEPS_PER_EPOCH = 4
EPOCHS = 2
CHECKPOINT_EVERY = 2
KILL_AFTER_STEP = 3          # killed after step 3: last.ckpt holds step 2, mid-epoch; step 3 is redone
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class KillAfterStep(Callback):
    """SIGKILL this process (no cleanup, no exception handlers) once training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def short_run_overrides() -> list[str]:
    """The demo experiment cut down: tiny synthetic set, small preset, 2 epochs of 4 steps, validation at
    the end, last.ckpt every 2 steps, no data-loader workers (so patches resume exactly)."""
    return ["experiment=cpu_demo", f"data.iterations_per_epoch={STEPS_PER_EPOCH}",
            f"trainer.max_epochs={EPOCHS}", f"trainer.check_val_every_n_epoch={EPOCHS}",
            "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "callbacks.rich_progress_bar=null",
            "callbacks.rich_model_summary=null",
            f"callbacks.step_checkpoint.every_n_train_steps={CHECKPOINT_EVERY}", "seed=7",
            "trainer.precision=32-true"]  # the demo trains in bf16 where the CPU has it; exact resume is float32


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_train")  # synthetic data and cache shared by the runs below


@pytest.fixture
def deterministic_mode_restored():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic="warn" switches it on globally


def train_in_process(train_root: Path, run_dir: Path, *extra: str) -> Path:
    from pancreas_mtl.training.train import train

    train(compose_train(train_root, run_dir, [*short_run_overrides(), *extra]))
    return run_dir


def final_state(run_dir: Path) -> tuple[int, dict, dict]:
    """(global step, model weights, last logged val/* metrics) of a finished run folder."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    rows = list(csv.DictReader((next((run_dir / "csv").glob("version_*")) / "metrics.csv").open()))
    validated = [row for row in rows if row.get("val/combined")]
    metrics = {key: float(value) for key, value in validated[-1].items() if key.startswith("val/") and value}
    weights = {key: value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")}
    return checkpoint["global_step"], weights, metrics


@pytest.fixture(scope="module")
def uninterrupted(train_root, tmp_path_factory):
    run_dir = train_in_process(train_root, tmp_path_factory.mktemp("uninterrupted") / "run")
    torch.use_deterministic_algorithms(False)
    return final_state(run_dir)


@pytest.mark.slow
def test_same_seed_gives_identical_runs(uninterrupted, train_root, tmp_path, deterministic_mode_restored):
    step, weights, metrics = final_state(train_in_process(train_root, tmp_path / "again"))
    assert step == uninterrupted[0] == STEPS_PER_EPOCH * EPOCHS
    assert metrics == uninterrupted[2]
    assert {"val/whole_pancreas_dice", "val/macro_f1", "val/combined"} <= set(metrics)
    for key, value in weights.items():
        torch.testing.assert_close(value, uninterrupted[1][key], rtol=0, atol=0)


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(uninterrupted, train_root, tmp_path,
                                                                  deterministic_mode_restored):
    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO_ROOT / "train.py"), *short_run_overrides(),
               "data.synthetic.size=tiny", "planning=small", "planning.spacing_scale=2", "data.num_workers=0",
               "data.preprocessing_workers=0", "data.progress=false", "logger=csv",
               f"paths.output_root={train_root}", f"hydra.run.dir={killed}",
               "+callbacks.kill._target_=tests.test_faults.KillAfterStep",
               f"+callbacks.kill.step={KILL_AFTER_STEP}"]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]

    # what the killed run left: a mid-epoch last.ckpt, and everything needed to repeat the run
    last = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == CHECKPOINT_EVERY and saved["global_step"] % STEPS_PER_EPOCH != 0
    assert (killed / ".hydra" / "config.yaml").is_file() and (killed / "plan.json").is_file()
    info = json.loads((killed / "run_info.json").read_text())
    assert info["pancreas_mtl_version"] and info["git_commit"]

    resumed = train_in_process(train_root, tmp_path / "resumed", f"ckpt_path={last}")
    step, weights, metrics = final_state(resumed)
    assert step == uninterrupted[0]
    assert metrics.keys() == uninterrupted[2].keys()
    for key, value in metrics.items():
        assert value == pytest.approx(uninterrupted[2][key], abs=RESUME_ATOL), key
    for key, value in weights.items():
        torch.testing.assert_close(value, uninterrupted[1][key], rtol=0, atol=RESUME_ATOL)


# --- prediction killed mid-folder -------------------------------------------------------------------------

@pytest.mark.slow
def test_prediction_killed_mid_folder_then_rerun_completes_the_rest(tmp_path):
    folder = tmp_path / "test"
    names = []
    rng = np.random.default_rng(0)
    for number in range(1, 13):  # about 0.2 s each: the run is killed well before its end
        image, _ = make_case_arrays(rng, shape_zyx=(20, 48, 56))
        write_nifti(image, lps_affine(), folder / f"quiz_{number:03d}_0000.nii.gz")
        names.append(f"quiz_{number:03d}")
    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    out = tmp_path / "pred"
    # torch in both runs: the rerun below predicts in this process, where no CPU engine runs (tests/forked.py)
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={out}", "inference=fast", "inference.engine=torch",
            "progress=false"]
    env = {**os.environ, **ONE_THREAD, "PANCREAS_MTL_OUTPUTS": str(tmp_path / "outputs")}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "predict.py"), *args, "num_threads=1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if len(finished_records(out)) >= 2:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    finished = sorted(record["case_id"] for record in finished_records(out))
    assert 2 <= len(finished) < len(names)
    # nothing under a final name is partial: every mask reads, and the tables are written only at the end
    for mask in out.glob("quiz_*.nii.gz"):
        assert read_volume(mask).shape == (20, 48, 56)
    assert not (out / "subtype_results.csv").exists()

    summary = run_predict(args)
    assert summary.skipped == finished and sorted(summary.predicted) == sorted(set(names) - set(finished))
    rows = (out / "subtype_results.csv").read_text().splitlines()
    assert rows[0] == "Names,Subtype"
    assert [row.split(",")[0] for row in rows[1:]] == [f"{n}.nii.gz" for n in names]  # each case once
    assert len((out / "subtype_probabilities.csv").read_text().splitlines()) == len(names) + 1


# --- two processes, one preprocessing cache ---------------------------------------------------------------

PREPARE_SCRIPT = """
import sys, time
from pathlib import Path
root, cache, ready, go = map(Path, sys.argv[1:5])
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.planning.planner import load_preset
ready.touch()
while not go.exists():
    time.sleep(0.005)
prepared = prepare_dataset({"root": str(root), "cache_dir": str(cache), "preprocessing_workers": 0},
                           load_preset("small"), progress=False)
print(len(prepared.cases))
"""


@pytest.mark.slow
def test_two_processes_preparing_one_dataset_leave_a_valid_cache(tmp_path):
    root = write_distributed_dataset(tmp_path / "quiz", train_per_subtype=4, validation_per_subtype=2,
                                     test_cases=0)
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, str(root), str(cache),
                                   str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start preparing at the same moment
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.split()[-1] == "18"

    index = discover(root)
    reference_cfg = {"root": str(root), "cache_dir": str(tmp_path / "reference"), "preprocessing_workers": 0}
    plan = prepare_dataset(reference_cfg, load_preset("small"), progress=False).plan
    folder = dataset_cache_root(cache, index) / plan.preprocessing_key()
    reference = {e.case_id: e for e in build_cache(index, plan, tmp_path / "inline", progress=False)}
    for case in index.labelled:
        entry = cached_entry(folder, case, plan.preprocessing_key())
        assert entry is not None, f"{case.case_id}: the shared cache entry is incomplete"
        np.testing.assert_array_equal(entry.load_image(), reference[case.case_id].load_image())
        np.testing.assert_array_equal(entry.load_seg(), reference[case.case_id].load_seg())
    assert not [p.name for p in folder.parent.rglob("*") if ".tmp" in p.name]
