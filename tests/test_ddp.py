"""Lightning DDP (trainer=ddp): the config composes, the batch is split with nnU-Net's semantics, every
rank forces its share of foreground patches, validation counts each case once, a non-finite loss is
skipped by every rank together, and a 2-process CPU run (gloo) trains, validates, checkpoints, is
killed and resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Callback
from torch.utils.data import DistributedSampler

from pancreas_mtl.dataset.sampling import PatchDataset
from tests.conftest import REPO_ROOT
from tests.test_experiments import EXPERIMENTS

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS_PER_EPOCH = 3
GLOBAL_BATCH = 6               # 3 patches per rank on 2 ranks: nnU-Net's rule forces exactly 1 of 3
KILL_AFTER_STEP = 5            # mid-epoch 2; last.ckpt (every 2 steps and every epoch end) holds step 4


# --- config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    *[[f"experiment={name}", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"] for name in EXPERIMENTS],
    ["trainer=gpu", "trainer.devices=4", "trainer.strategy=ddp"],  # the reported command line
])
def test_trainer_ddp_composes_with_every_experiment(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4
    assert cfg.module.nonfinite_loss == "skip"  # the default works on any number of devices


# --- batch and sampling per rank ---------------------------------------------------------------------------

class FakeTrainer(SimpleNamespace):
    """What the data module reads of a Trainer: the world size and the rank."""


def ranked_datamodule(datamodule_factory, world_size: int, rank: int, batch_size: int):
    datamodule = datamodule_factory(batch_size)
    datamodule.trainer = FakeTrainer(world_size=world_size, global_rank=rank)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def datamodule_factory(tmp_path_factory):
    from tests.test_experiments import compose_train
    from pancreas_mtl.training.train import prepare

    root = tmp_path_factory.mktemp("ddp_data")

    def make(batch_size: int):
        cfg = compose_train(root, root / "run", ["experiment=cpu_demo", f"data.batch_size={batch_size}",
                                                 "data.iterations_per_epoch=6", "augmentation=none"])
        (root / "run").mkdir(exist_ok=True)
        return prepare(cfg)
    return make


def forced_flags(dataset: PatchDataset, count: int) -> list[bool]:
    rng = np.random.default_rng(0)
    return [dataset._force_foreground(index, rng) for index in range(count)]


@pytest.mark.slow
def test_global_batch_is_split_and_each_rank_reads_its_own_patches(datamodule_factory):
    for rank in range(2):
        datamodule = ranked_datamodule(datamodule_factory, world_size=2, rank=rank, batch_size=GLOBAL_BATCH)
        assert datamodule.global_batch_size == GLOBAL_BATCH and datamodule.batch_size == GLOBAL_BATCH // 2
        assert len(datamodule.train_dataset) == 6 * GLOBAL_BATCH // 2  # 6 steps per epoch on every rank
        loader = datamodule.train_dataloader()
        # Lightning leaves a DistributedSampler in place: each rank reads every index of its own dataset
        assert isinstance(loader.sampler, DistributedSampler) and list(loader.sampler) == list(range(18))
        flags = forced_flags(datamodule.train_dataset, len(datamodule.train_dataset))
        assert flags == [False, False, True] * 6  # one third of every batch, on every rank
        batch = next(iter(loader))
        assert batch["image"].shape[0] == GLOBAL_BATCH // 2
    with pytest.raises(ValueError, match="does not split evenly over 4 processes"):
        ranked_datamodule(datamodule_factory, world_size=4, rank=0, batch_size=GLOBAL_BATCH)


@pytest.mark.slow
def test_each_rank_resumes_its_own_patch_stream(datamodule_factory, monkeypatch):
    streams = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))  # what the patch stream is seeded with outside a process group
        dataset = ranked_datamodule(datamodule_factory, world_size=2, rank=rank, batch_size=2).train_dataset
        dataset[0]
        streams.append(dataset.rng_state(1))
    assert streams[0]["state"] != streams[1]["state"]  # seeded with the rank
    for rank in range(2):
        datamodule = ranked_datamodule(datamodule_factory, world_size=2, rank=rank, batch_size=2)
        datamodule.load_state_dict({"train_patch_rng_by_rank": streams})
        assert datamodule.train_dataset.rng_state(1) == streams[rank]


@pytest.mark.slow
def test_subtype_balanced_draws_stay_balanced_per_rank(datamodule_factory):
    datamodule = ranked_datamodule(datamodule_factory, world_size=2, rank=1, batch_size=2)
    sampler = datamodule.train_dataset.sampler
    sampler.subtype_balanced = True
    rng = np.random.default_rng(1)
    subtypes = [int(sampler.cases[sampler.draw_case(rng)].subtype) for _ in range(3000)]
    assert np.allclose(np.bincount(subtypes) / len(subtypes), 1 / 3, atol=0.03)


def test_batch_of_one_per_rank_still_forces_a_share_of_foreground():
    """Global batch 2 on 2 ranks: nnU-Net's per-batch rule forces none of a 1-patch batch; a coin flip does."""
    dataset = PatchDataset.__new__(PatchDataset)
    dataset.sampler = SimpleNamespace(oversample_foreground=0.33)
    dataset.batch_size = 1
    assert np.mean(forced_flags(dataset, 3000)) == pytest.approx(0.33, abs=0.03)
    dataset.batch_size = 2
    assert forced_flags(dataset, 4) == [False, True, False, True]  # nnU-Net's rule, unchanged


# --- validation and the non-finite policy in-process ------------------------------------------------------

def test_gathered_validation_counts_each_case_once():
    """Lightning's distributed sampler pads 5 cases to 6 on 2 ranks: the repeated case counts once."""
    from pancreas_mtl.training.module import MultiTaskModule

    cases = [{"case_id": f"case{i}", "dice": float(i)} for i in (0, 2, 4, 1, 3, 0)]  # rank 0 + rank 1, padded
    module = SimpleNamespace(trainer=SimpleNamespace(world_size=1))
    gathered = MultiTaskModule._gathered(module, cases)
    assert [c["case_id"] for c in gathered] == [f"case{i}" for i in range(5)]
    # the validation and inner validation splits are counted apart, each case once per split
    split = [{**case, "split": "inner" if case["case_id"] == "case1" else "val"} for case in cases]
    split += [{"case_id": "case1", "split": "val"}]
    gathered = MultiTaskModule._gathered(module, split)
    assert [(c["split"], c["case_id"]) for c in gathered] == [("inner", "case1"), *(("val", f"case{i}") for i in range(5))]


# --- 2 processes on the CPU ---------------------------------------------------------------------------------

class RecordRank(Callback):
    """Writes, per rank, the foreground-forcing decision of every patch, the steps it ran and the steps it
    skipped; optionally makes rank 1's loss NaN at one step, or kills every rank after one."""

    def __init__(self, kill_after_step: int = 0, nan_on_rank1_at_step: int = -1):
        self.kill_after_step = kill_after_step
        self.nan_on_rank1_at_step = nan_on_rank1_at_step
        self.flags: list[bool] = []
        self.before_skip: list[torch.Tensor] | None = None
        self.skip_changed_state: bool | None = None

    @staticmethod
    def weights_and_momenta(trainer, pl_module) -> list[torch.Tensor]:
        momenta = [value for state in trainer.optimizers[0].state.values() for value in state.values()
                   if isinstance(value, torch.Tensor)]
        return [t.detach().clone() for t in [*pl_module.parameters(), *momenta]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.nan_on_rank1_at_step:
            self.before_skip = self.weights_and_momenta(trainer, pl_module)
            if trainer.global_rank == 1:
                batch["image"][:] = float("nan")

    def on_train_start(self, trainer, pl_module):
        dataset = trainer.datamodule.train_dataset
        decide = dataset._force_foreground

        def recorded(index, rng):
            flag = decide(index, rng)
            self.flags.append(bool(flag))
            return flag
        dataset._force_foreground = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before_skip is not None and self.skip_changed_state is None:
            after = self.weights_and_momenta(trainer, pl_module)
            self.skip_changed_state = len(after) != len(self.before_skip) or any(
                not torch.equal(a, b) for a, b in zip(after, self.before_skip))
        if self.kill_after_step and trainer.global_step >= self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # every rank at the same step: no rank left waiting

    def on_train_end(self, trainer, pl_module):
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"flags": self.flags, "global_step": trainer.global_step,
                                    "batch_size": trainer.datamodule.batch_size,
                                    "skipped": pl_module.nonfinite_steps,
                                    "skip_changed_state": self.skip_changed_state}))


def experiment_overrides() -> list[str]:
    """The demo experiment, 2 epochs of 3 steps, validation at the end on a fold of 5 cases (odd)."""
    return ["experiment=cpu_demo", "trainer.deterministic=warn", "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
            "data.split=kfold", "data.num_folds=4", f"data.iterations_per_epoch={STEPS_PER_EPOCH}",
            f"data.batch_size={GLOBAL_BATCH}", "augmentation=none", "module.num_overlays=0", "seed=3"]


def run_overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """train.py on 2 CPU processes (tests.test_experiments.compose_train's tiny-set settings)."""
    return [*experiment_overrides(), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "data.synthetic.size=tiny", "planning=small", "planning.spacing_scale=2",
            "data.num_workers=0", "data.preprocessing_workers=0", "data.progress=false", "logger=csv",
            "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "callbacks.model_checkpoint=null",
            "callbacks.step_checkpoint.every_n_train_steps=2", f"paths.output_root={data_root}",
            f"hydra.run.dir={run_dir}", "+callbacks.record._target_=tests.test_ddp.RecordRank", *extra]


def run_train(overrides: list[str], cwd: Path, expect_kill: bool = False) -> None:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *overrides], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        try:  # ranks Lightning started are in the run's own session: none outlives the test
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if expect_kill:
        assert process.returncode == -signal.SIGKILL, output[-4000:]
    else:
        assert process.returncode == 0, output[-4000:]


def logged_validation(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((next((run_dir / "csv").glob("version_*")) / "metrics.csv").open()))
    validated = [row for row in rows if row.get("val/combined")]
    return {key: float(value) for key, value in validated[-1].items() if key.startswith(("val/", "inner/", "select/")) and value}


def validate_in_one_process(data_root: Path, run_dir: Path, checkpoint: Path) -> dict[str, float]:
    import lightning as L

    from tests.test_experiments import compose_train
    from pancreas_mtl.training.train import build_module, prepare

    cfg = compose_train(data_root, run_dir, experiment_overrides())
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = prepare(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.plan, datamodule.subtype_counts())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=run_dir)
    metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=str(checkpoint), weights_only=True)[0]
    cases = len(datamodule.val_dataset)
    assert cases % 2 == 1 and len(module.last_validation["cases"]) == cases  # odd: on 2 ranks one case repeats
    return {key: float(value) for key, value in metrics.items()}


@pytest.mark.slow
def test_two_process_cpu_run_trains_validates_checkpoints_and_resumes(tmp_path):
    data_root = tmp_path / "outputs"
    run_dir = tmp_path / "run"
    run_train(run_overrides(data_root, run_dir, "+callbacks.record.nan_on_rank1_at_step=1"), tmp_path)

    # rank 0 wrote the run files and the checkpoint; each rank ran 2 x 3 steps of 3 patches
    assert (run_dir / "plan.json").is_file()
    assert not any("train_ddp_process" in arg for arg in json.loads((run_dir / "run_info.json").read_text())["command"])
    assert not list(run_dir.glob("**/train_ddp_process_*"))  # no second run folder or config copy
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH
    for rank in range(2):
        record = json.loads((run_dir / f"rank{rank}.json").read_text())
        assert record["global_step"] == 2 * STEPS_PER_EPOCH and record["batch_size"] == GLOBAL_BATCH // 2
        flags = np.array(record["flags"]).reshape(-1, GLOBAL_BATCH // 2)  # (batches drawn, patches)
        assert (flags.sum(axis=1) == 1).all(), flags  # one third of every batch on every rank
        assert record["skipped"] == 1  # rank 1's NaN loss at step 1: both ranks skipped it, and went on
        assert record["skip_changed_state"] is False  # weights and AdamW moments as they were

    # validation on 2 processes equals 1 process on the same checkpoint, each case once (5 cases: odd)
    distributed = logged_validation(run_dir)
    single = validate_in_one_process(data_root, tmp_path / "single", run_dir / "checkpoints" / "last.ckpt")
    assert {"val/whole_pancreas_dice", "val/lesion_dice", "val/macro_f1", "val/combined"} <= distributed.keys()
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-6), key

    # SIGKILL after step 5 (last.ckpt: step 4, mid-epoch, with each rank's own patch stream), then a resume finishes
    killed = tmp_path / "killed"
    run_train(run_overrides(data_root, killed, f"+callbacks.record.kill_after_step={KILL_AFTER_STEP}"),
              tmp_path, expect_kill=True)
    last = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    [datamodule_state] = [v for k, v in saved.items() if k.endswith("PancreasDataModule")]
    streams = datamodule_state["train_patch_rng_by_rank"]
    assert len(streams) == 2 and streams[0]["state"] != streams[1]["state"]
    resumed = tmp_path / "resumed"
    run_train(run_overrides(data_root, resumed, f"ckpt_path={last}"), tmp_path)
    saved = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH
    assert {"val/combined"} <= logged_validation(resumed).keys()
