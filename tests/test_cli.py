"""The ``pancreas-mtl`` command: every command runs with key=value overrides of conf/<command>.yaml, shows
its keys with --help, and names an unknown or missing key; nothing is written into the working directory."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pancreas_mtl.commands.cli import main
from pancreas_mtl.commands.tools import COMMANDS
from pancreas_mtl.config import config_dir

REQUIRED = {"generate": ["out"], "convert": ["source", "destination"], "check": ["root"],
            "evaluate": ["pred", "gt", "out"], "crossval": ["multirun"], "holdout": ["multirun"], "compare": ["runs", "out"],
            "export": ["ckpt", "out"]}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """An empty working directory, to show that a command writes only where its keys say."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_generate_convert_check_evaluate_with_key_value(tmp_path, empty_cwd, capsys):
    synthetic, converted = tmp_path / "synthetic_tiny", tmp_path / "Dataset501_Tiny"
    assert main(["generate", "size=tiny", f"out={synthetic}", "seed=3"]) == 0
    assert json.loads((synthetic / "synthetic.json").read_text())["config"]["seed"] == 3
    assert main(["convert", f"source={synthetic}", f"destination={converted}", "name=Tiny", "link=true"]) == 0
    assert json.loads((converted / "dataset.json").read_text())["name"] == "Tiny"
    assert next((converted / "imagesTr").iterdir()).is_symlink()
    capsys.readouterr()
    assert main(["check", f"root={converted}", "workers=0"]) == 0
    assert "all 18 labelled case(s) readable" in capsys.readouterr().out

    pred = tmp_path / "pred"  # the reference as the prediction: every score perfect
    shutil.copytree(synthetic / "test_labels", pred)
    shutil.copy(pred / "subtype_reference.csv", pred / "subtype_results.csv")
    out = tmp_path / "evaluation"
    assert main(["evaluate", f"pred={pred}", f"gt={synthetic / 'test_labels'}", f"out={out}", "bootstrap=10",
                 "plots=false", "progress=false", "tolerance_mm=1.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 6 and summary["classification"]["macro_f1"] == 1.0
    assert summary["inputs"]["tolerance_mm"] == 1.5
    assert list(empty_cwd.iterdir()) == []  # no Hydra run folder, log or output in the working directory


def test_help_lists_the_commands_and_each_command_prints_its_keys(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {command}" in listing for command in COMMANDS)
    assert "pancreas-mtl <command> --help" in listing
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: pancreas-mtl {command} key=value")
        assert (config_dir() / f"{command}.yaml").read_text().rstrip() in text  # the YAML, comments and all
    assert main([]) == 2 and "commands:" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_key_names_it_and_the_known_ones(command, empty_cwd, capsys):
    assert main([command, "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'no_such_key'" in err
    assert all(key in err for key in OmegaConf.load(config_dir() / f"{command}.yaml"))
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_required_keys_are_named(command, tmp_path, capsys):
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert "missing required key(s)" in err and all(f"{key}=..." in err for key in REQUIRED[command])
    first, *others = REQUIRED[command]
    if others:  # one given, the others still named
        assert main([command, f"{first}={tmp_path / 'x'}"]) == 2
        err = capsys.readouterr().err
        assert f"{first}=..." not in err and all(f"{key}=..." in err for key in others)


def test_required_keys_are_the_yaml_s_question_marks():
    for command in COMMANDS:
        defaults = OmegaConf.load(config_dir() / f"{command}.yaml")
        assert [key for key in defaults if OmegaConf.is_missing(defaults, key)] == REQUIRED[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_schema_types_exactly_the_keys_of_its_yaml(command):
    schema = COMMANDS[command].schema()
    assert [field.name for field in dataclasses.fields(schema)] == list(OmegaConf.load(config_dir() / f"{command}.yaml"))


@pytest.mark.parametrize("args, expected", [
    (["generate", "out=/tmp/x", "seed=abc"], "seed: Value 'abc'"),
    (["generate", "--size", "tiny"], "'--size': options are key=value: size=..."),
    (["convert", "source=/a", "destination=/b", "--overwrite"], "options are key=value: overwrite=true"),
    (["check", "/data/quiz"], "'/data/quiz' is not key=value, e.g. root=/data/quiz"),
    (["check", "root=/a,/b"], "one value per key"),
    (["check", "+root=/a"], "give the key as root=value"),
    (["check", "root=/tmp/(1)"], "quote a value"),
    (["fit", "x=1"], "unknown command 'fit'"),
])
def test_usage_errors_say_what_to_type(args, expected, capsys):
    assert main(args) == 2
    assert expected in capsys.readouterr().err


def test_a_quoted_value_may_hold_spaces_and_brackets(tmp_path, capsys):
    odd = tmp_path / "a folder (1)"
    assert main(["check", f"root='{odd}'", "workers=0"]) == 1  # parsed, then not found, naming the folder
    assert str(odd) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["crossval", "holdout"])
def test_a_key_named_like_a_config_group_is_a_plain_value(command):
    from pancreas_mtl.commands.cli import load_config  # conf/inference/ is a group for train.py; here inference is a string

    cfg = load_config(command, ["multirun=/x", "inference=accurate", "splits=[validation]"][: 2 + (command == "holdout")])
    assert cfg.inference == "accurate" and cfg.multirun == "/x"


def test_python_m_pancreas_mtl_is_the_same_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pancreas_mtl", "evaluate", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.startswith("usage: pancreas-mtl evaluate key=value")
    result = subprocess.run([sys.executable, "-m", "pancreas_mtl", "evaluate", "pred=/nowhere"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "gt=..." in result.stderr
    assert list(tmp_path.iterdir()) == []
