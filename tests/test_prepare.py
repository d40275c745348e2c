"""From a dataset folder to batches: prepare_dataset, the data module, the CLI and train.py prepare_only."""

import json
import subprocess
import sys

import pytest
import torch

from pancreas_mtl.commands.cli import main as cli_main
from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.planning.planner import load_preset
from tests.conftest import REPO_ROOT


def data_cfg(root, cache, **extra):
    return {"root": str(root), "cache_dir": str(cache), "preprocessing_workers": 0, "progress": False,
            "num_workers": 0, "iterations_per_epoch": 3, "batch_size": 2, "split": "auto", "fold": 0,
            "sampling": {"oversample_foreground": 0.33, "lesion_centred_probability": 0.0, "subtype_balanced": False},
            **extra}


def small_planning(**overrides):
    return {**load_preset("small"), "overrides": overrides}


def test_prepare_then_batches(distributed_dataset, tmp_path):
    prepared = prepare_dataset(data_cfg(distributed_dataset, tmp_path / "cache"), small_planning(), progress=False)
    assert prepared.split.source == "validation folder"
    assert len(prepared.split.train) == 6 and len(prepared.split.val) == 3
    assert (prepared.cache_root / "fingerprint.json").is_file()
    module = PancreasDataModule(prepared, data_cfg(distributed_dataset, tmp_path / "cache"), {"spatial": {"enabled": False}})
    module.setup("fit")
    assert module.subtype_counts() == {0: 2, 1: 2, 2: 2}
    batches = list(module.train_dataloader())
    assert len(batches) == 3
    batch = batches[0]
    patch = prepared.plan.patch_size
    assert batch["image"].shape == (2, 1, *patch) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, *patch)
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1, 2}
    assert batch["subtype"].dtype == torch.int64 and len(batch["case_id"]) == 2
    assert all(case_id in prepared.split.train for b in batches for case_id in b["case_id"])
    val = next(iter(module.val_dataloader()))
    assert val["case_id"][0] in prepared.split.val and val["image"].ndim == 5


def test_prepare_reuses_fingerprint_and_cache(distributed_dataset, tmp_path):
    cfg = data_cfg(distributed_dataset, tmp_path / "cache")
    first = prepare_dataset(cfg, small_planning(), progress=False)
    stamp = (first.cache_root / "fingerprint.json").stat().st_mtime_ns
    second = prepare_dataset(cfg, small_planning(), progress=False)
    assert (second.cache_root / "fingerprint.json").stat().st_mtime_ns == stamp
    assert second.plan == first.plan


def test_plan_override_reaches_the_batches(distributed_dataset, tmp_path):
    prepared = prepare_dataset(data_cfg(distributed_dataset, tmp_path / "cache"),
                               small_planning(patch_size=[8, 16, 16], batch_size=3), progress=False)
    assert prepared.plan.patch_size == (8, 16, 16) and prepared.plan.batch_size == 3


def test_kfold_on_distributed_layout(distributed_dataset, tmp_path):
    prepared = prepare_dataset(data_cfg(distributed_dataset, tmp_path / "cache", split="kfold", fold=1, num_folds=3),
                               small_planning(), progress=False)
    assert len(prepared.split.val) == 3 and len(prepared.split.train) == 6
    assert "3-fold" in prepared.split.source


def test_cli_check_and_convert(distributed_dataset, tmp_path, capsys):
    assert cli_main(["check", f"root={distributed_dataset}", "workers=0"]) == 0
    assert "all 9 labelled case(s) readable" in capsys.readouterr().out
    assert cli_main(["convert", f"source={distributed_dataset}", f"destination={tmp_path / 'nn'}"]) == 0
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["numTraining"] == 9
    (distributed_dataset / "train" / "subtype0" / "quiz_0_001.nii.gz").write_bytes(b"junk")
    assert cli_main(["check", f"root={distributed_dataset}", "workers=0"]) == 1
    assert "quiz_0_001" in capsys.readouterr().err


@pytest.mark.slow
def test_train_prepare_only_end_to_end(tmp_path):
    """train.py on the tiny synthetic set: generates, plans, preprocesses, samples one batch."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "data.synthetic.size=tiny", "planning=small",
               "planning.spacing_scale=2", "prepare_only=true", "data.num_workers=0",
               f"paths.output_root={tmp_path}", "hydra.job_logging.root.level=INFO"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1
    plan = json.loads((runs[0] / "plan.json").read_text())
    assert plan["preset"] == "small" and len(plan["patch_size"]) == 3
    assert (runs[0] / ".hydra" / "config.yaml").is_file() and (runs[0] / "fingerprint.json").is_file()
    assert (tmp_path / "data" / "synthetic_tiny" / "train").is_dir()
    assert "first training batch" in result.stdout + result.stderr


def test_data_settings_come_from_folder_yaml_and_unknown_keys_are_errors():
    from omegaconf import OmegaConf

    from pancreas_mtl.dataset.settings import data_settings

    folder = OmegaConf.load(REPO_ROOT / "conf" / "data" / "folder.yaml")
    settings = data_settings({"root": "/data", "cache_dir": "/cache"})
    assert (settings.num_workers, settings.iterations_per_epoch) == (folder.num_workers, folder.iterations_per_epoch)
    assert settings.limits["max_spacing_mm"] == OmegaConf.load(REPO_ROOT / "conf" / "limits" / "default.yaml").max_spacing_mm
    with pytest.raises(ValueError, match=r"data\.num_worker: .*expected one of \[.*'num_workers'"):
        data_settings({"root": "/data", "cache_dir": "/cache", "num_worker": 4})  # a typo used to be ignored
    with pytest.raises(ValueError, match=r"data\.root: .*missing mandatory value"):
        data_settings({"cache_dir": "/cache"})
