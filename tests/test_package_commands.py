"""``pancreas-mtl train|predict|tune`` run the Hydra commands of train.py, predict.py and tune.py: the same
grammar, config and exit codes, and (train) a sys.argv that Lightning's DDP launcher can run again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pancreas_mtl.commands import cli
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("command", ["train", "predict", "tune"])
def test_the_command_sees_its_overrides_with_its_own_file_as_argv0(command, monkeypatch):
    import importlib

    module = importlib.import_module(f"pancreas_mtl.commands.{command}")
    seen = {}
    monkeypatch.setattr(module, "main", lambda: seen.setdefault("argv", list(sys.argv)) and None)
    monkeypatch.setattr(sys, "argv", ["pancreas-mtl", command, "seed=3", "-m"])
    assert cli.main([command, "seed=3", "-m"]) == 0
    assert seen["argv"] == [module.__file__, "seed=3", "-m"]


def test_argv0_runs_the_same_train_command_as_train_py(tmp_path):
    """What a DDP rank > 0 runs (``python <argv[0]> <overrides>``) composes the same config as train.py."""
    overrides = ["experiment=cpu_demo", "seed=7", "--cfg", "job"]
    from pancreas_mtl.commands import train

    printed = [subprocess.run([sys.executable, str(script), *overrides], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, check=True).stdout
               for script in (Path(train.__file__), REPO_ROOT / "train.py")]
    assert printed[0] == printed[1] and "seed: 7" in printed[0]
    assert list(tmp_path.iterdir()) == []  # --cfg prints; nothing is written


def test_package_help_lists_the_hydra_commands(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in ("train", "predict", "tune", "generate", "evaluate", "export"):
        assert f"\n  {name} " in usage


def test_tune_help_prints_its_config(capsys):
    pytest.importorskip("optuna")
    assert cli.main(["tune", "--help"]) == 0
    assert "tune:" in capsys.readouterr().out
