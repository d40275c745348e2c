"""Configs read back from files (a checkpoint's model config) build networks only through the allowlist:
no import of a named object, no nested Hydra directives, and the code they would run never runs."""

from __future__ import annotations

import pytest
import torch

from pancreas_mtl.inference.checkpoint import load_network, read_checkpoint
from pancreas_mtl.models.factory import UntrustedConfigError, head_classes
from pancreas_mtl.models.multitask import build_model
from tests.conf_values import head_values
from tests.predict_helpers import run_predict, save_checkpoint, tiny_plan, write_cases


class Opaque:
    """Any class instance; a real attack would make its unpickling run code."""


def _tampered(tmp_path, edit) -> tuple:
    """A valid tiny checkpoint whose stored model config ``edit(model_cfg)`` changed, and the file the
    payloads below try to write."""
    path = save_checkpoint(tmp_path / "tampered.ckpt", tiny_plan())
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["pancreas_mtl"]["config"]["model"])
    torch.save(checkpoint, path)
    return path, tmp_path / "pwned.txt"


def _write_file_node(target) -> dict:
    """The issue's payload: Hydra would call pathlib.Path.write_text while building the value."""
    return {"_target_": "builtins.min", "_args_": [0.01, {"_target_": "pathlib.Path.write_text",
                                                         "self": {"_target_": "pathlib.Path", "_args_": [str(target)]},
                                                         "data": "0.5"}]}


@pytest.mark.parametrize("where", ["backbone", "head"])
def test_nested_target_in_a_checkpoint_config_is_refused_unrun(tmp_path, where):
    def edit(model_cfg):
        key = "negative_slope" if where == "backbone" else "dropout"
        model_cfg[where][key] = _write_file_node(tmp_path / "pwned.txt")

    path, pwned = _tampered(tmp_path, edit)
    with pytest.raises(UntrustedConfigError, match=rf"model\.{where}\.\w+\._target_: a nested Hydra directive"):
        load_network(path)
    assert not pwned.exists()


@pytest.mark.parametrize(("entry", "message"), [
    ({"_target_": "os.system", "_partial_": True, "command": "touch pwned"},
     r"model\.head\._target_: 'os\.system' is not one of this package's model classes \(allowed: .*SingleStageHead"),
    ({"_target_": "pancreas_mtl.models.heads.SingleStageHead", "_args_": [[4, 8], 3]},
     r"model\.head\._args_: Hydra directives other than _target_ and _partial_"),
    ({"_target_": "pancreas_mtl.models.heads.SingleStageHead", "_recursive_": True},
     r"model\.head\._recursive_"),
    ({"_target_": "pancreas_mtl.models.heads.SingleStageHead", "pool": {"mode": "max"}, "drop": 0.1},
     r"takes no argument\(s\) \['drop'\]"),
    ({"_target_": "pancreas_mtl.models.heads.SingleStageHead", "pool": b"max"},
     r"model\.head\.pool: expected a plain value .* found bytes"),
])
def test_heads_outside_the_allowlist_or_with_directives_are_refused_by_name(tmp_path, entry, message):
    path, _ = _tampered(tmp_path, lambda model_cfg: model_cfg.__setitem__("head", entry))
    with pytest.raises(UntrustedConfigError, match=message):
        load_network(path)


def test_a_backbone_outside_the_allowlist_is_refused(tmp_path):
    def edit(model_cfg):
        model_cfg["backbone"]["_target_"] = "subprocess.run"

    path, _ = _tampered(tmp_path, edit)
    with pytest.raises(UntrustedConfigError, match=r"model\.backbone\._target_: 'subprocess\.run' is not one of"):
        load_network(path)


def test_every_head_of_the_package_is_allowed_and_builds():
    names = {name.rsplit(".", 1)[1] for name in head_classes()}
    assert {"SingleStageHead", "MultiStageHead", "OneVsRestHead", "LesionAttentionHead"} <= names
    head = {"_target_": "pancreas_mtl.models.heads.MultiStageHead", "_partial_": True,
            **head_values("multistage", hidden=0)}
    model_cfg = {"backbone": {"_target_": "pancreas_mtl.models.resenc_unet.ResEncUNet.from_plan", "_partial_": True},
                 "head": head}
    model = build_model(model_cfg, tiny_plan())
    assert type(model.head).__name__ == "MultiStageHead"
    # the knobs have no defaults: a stored config without one (saved before it existed) names what it lacks
    with pytest.raises(ValueError, match="model.head: pancreas_mtl.models.heads.MultiStageHead needs region"):
        build_model({**model_cfg, "head": {k: v for k, v in head.items() if k != "region"}}, tiny_plan())


def test_predict_command_refuses_a_tampered_checkpoint_and_writes_nothing(tmp_path):
    path, pwned = _tampered(tmp_path, lambda cfg: cfg["backbone"].__setitem__("negative_slope",
                                                                             _write_file_node(tmp_path / "pwned.txt")))
    write_cases(tmp_path / "in", count=1)
    with pytest.raises(UntrustedConfigError, match="nested Hydra directive"):
        run_predict([f"ckpt={path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"])
    assert not pwned.exists()
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_refused_without_torch_advice_to_disable_the_guard(tmp_path):
    path = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["pancreas_mtl"]["extra"] = Opaque()  # an instance of a class: refused by weights_only
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="holds objects other than tensors and plain values") as error:
        read_checkpoint(path)
    assert "weights_only=False" not in str(error.value)


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda p: p.mkdir(), ValueError, r"is a folder, expected a checkpoint file .*; it holds no \*\.ckpt file"),
    (lambda p: (p / "checkpoints").mkdir(parents=True) or (p / "checkpoints" / "last.ckpt").write_bytes(b"x"),
     ValueError, r"is a folder, .*checkpoints inside it: checkpoints/last\.ckpt"),
    (lambda p: p.write_bytes(b""), ValueError, r"is empty \(0 bytes\)"),
    (lambda p: p.write_text('{"plan": {}}'), ValueError, r"is a JSON or text file"),
    (lambda p: p.write_bytes(b"PK\x03\x04 half a zip"), ValueError, r"cannot read the checkpoint \(RuntimeError"),
    (lambda p: p.symlink_to(p.parent / "gone.ckpt"), FileNotFoundError, r"not found \(a broken symbolic link\)"),
])
def test_a_ckpt_that_is_not_a_checkpoint_says_what_was_found(tmp_path, make, error, message):
    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(error, match=message) as raised:
        read_checkpoint(path)
    assert "weights_only" not in str(raised.value)
