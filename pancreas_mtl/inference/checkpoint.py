"""Reading a trained network, its plan and its run config from a checkpoint, without importing Lightning
(or an exported model folder, ``model_folder``, in its place).

A training checkpoint (``pancreas_mtl.module.MultiTaskModule``) holds the weights under
``state_dict`` with the prefix ``model.`` and, under ``pancreas_mtl``, the plan (``Plan.to_dict()``)
and the resolved run config (plain containers whose ``model`` entry builds the network). It is read
with ``torch.load(weights_only=True)``, so an untrusted file cannot run code. Lightning's import costs
about 6 s of start-up, which the predictor does not need.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from pancreas_mtl.inference.model_folder import MANIFEST, ExportedModel, is_model_folder, read_model_folder
from pancreas_mtl.models.multitask import MultiTaskNet, build_model
from pancreas_mtl.planning.plan import Plan

MODEL_PREFIX = "model."


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is, when it plainly is not a checkpoint file (missing, a folder, empty, text); else None."""
    if not path.exists():
        return f"checkpoint {path} not found" + (" (a broken symbolic link)" if path.is_symlink() else "")
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:4]
        hint = f"; checkpoints inside it: {', '.join(found)}" if found else "; it holds no *.ckpt file"
        return (f"{path} is a folder, expected a checkpoint file (e.g. <run>/checkpoints/last.ckpt) or a model "
                f"folder written by pancreas-mtl export (with its {MANIFEST}){hint}")
    if not path.is_file():
        return f"{path} is not a regular file, expected a checkpoint"
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return f"{path} is empty (0 bytes), expected a checkpoint"
    if head.lstrip()[:1] in (b"{", b"["):
        return f"{path} is a JSON or text file, expected a torch checkpoint written by training (.ckpt)"
    return None


def _load_error(path: Path, error: Exception) -> str:
    """The message for a checkpoint torch.load refused, without torch's advice to turn the guard off."""
    if isinstance(error, pickle.UnpicklingError):
        return (f"{path}: the checkpoint holds objects other than tensors and plain values; it is refused "
                "because unpickling them could run code (training writes none)")
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    detail = "" if "weights_only" in first_line else f": {first_line}"
    return f"{path}: cannot read the checkpoint ({type(error).__name__}{detail}); is the file complete?"


ENSEMBLE_FILE = "ensemble.yaml"  # written by pancreas-mtl crossval: the fold checkpoints of a sweep
ENSEMBLE_SUFFIXES = (".yaml", ".yml")


def expand_checkpoints(paths: Sequence[str | Path]) -> list[str]:
    """``paths`` with every ensemble file (``checkpoints: [...]``, relative paths from its folder) and every
    folder holding ``ensemble.yaml`` replaced by the checkpoints it lists; other paths are kept as given."""
    expanded: list[str] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
            path = path / ENSEMBLE_FILE
        if path.suffix.lower() not in ENSEMBLE_SUFFIXES or not path.is_file():
            expanded.append(str(given))
            continue
        content = yaml.safe_load(path.read_text())
        listed = content.get("checkpoints") if isinstance(content, dict) else None
        if not isinstance(listed, list) or not listed:
            raise ValueError(f"{path}: an ensemble file lists its checkpoints as 'checkpoints: [a.ckpt, ...]'; "
                             f"found {listed!r}")
        expanded += [str(path.parent / str(item)) for item in listed]  # an absolute item stays absolute
    return expanded


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Plan, dict]:
    """(the model's state dict without the ``model.`` prefix, the plan, the run config) of a checkpoint."""
    path = Path(path)
    problem = _not_a_checkpoint(path)
    if problem:
        raise (FileNotFoundError if not path.exists() else ValueError)(problem)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(_load_error(path, error)) from None
    saved = checkpoint.get("pancreas_mtl") if isinstance(checkpoint, dict) else None
    if not saved or not saved.get("plan") or not saved.get("config") or "model" not in saved["config"]:
        raise ValueError(f"{path}: not a pancreas_mtl training checkpoint (expected checkpoint['pancreas_mtl'] "
                         "with 'plan' and a 'config' holding 'model')")
    state = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith(MODEL_PREFIX)}
    if not state:
        raise ValueError(f"{path}: the checkpoint's state_dict holds no '{MODEL_PREFIX}*' weights")
    return state, Plan.from_dict(saved["plan"]), saved["config"]


def state_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], limit: int = 4) -> list[str]:
    """What keeps ``found`` weights from loading into a network whose state dict is ``expected``: tensors
    missing, unexpected, or of another shape (the first ``limit`` of each, with counts); [] if they fit."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} {tuple(found[key].shape)} where the network has {tuple(expected[key].shape)}"
                for key in expected if key in found and tuple(found[key].shape) != tuple(expected[key].shape)]
    lines = []
    for what, items in (("of another shape", reshaped), ("missing", missing), ("not in the network", unexpected)):
        if items:
            more = f", and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"{len(items)} tensor(s) {what}: {'; '.join(items[:limit])}{more}")
    return lines


def config_differences(ours: Any, theirs: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs (plain containers), as
    ``key: ours vs theirs``."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        lines = []
        for key in sorted(set(ours) | set(theirs), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            lines += config_differences(ours.get(key, "<absent>"), theirs.get(key, "<absent>"), name)
        return lines
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        ours, theirs = list(ours), list(theirs)
    return [] if ours == theirs else [f"{prefix}: {ours!r} vs {theirs!r}"]


def load_network(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiTaskNet, Plan, dict]:
    """The trained network (eval mode, the checkpoint's weights), its :class:`Plan` and the run config."""
    state, plan, config = read_checkpoint(path, map_location)
    model = build_model(config["model"], plan)
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"{path}: the weights do not fit the network its plan and config describe (was the file "
                         "put together from different runs?):\n  " + "\n  ".join(mismatch))
    model.load_state_dict(state)
    return model.eval(), plan, config


def load_predictable(path: str | Path) -> tuple[MultiTaskNet | ExportedModel, Plan]:
    """What ``predict.py ckpt=`` names: a training checkpoint (its network, in eval mode, and plan), or a
    model folder written by ``pancreas-mtl export``, recognised by its manifest (read, never built from)."""
    if is_model_folder(path):
        exported = read_model_folder(path)
        return exported, exported.plan
    network, plan, _ = load_network(path)
    return network, plan
