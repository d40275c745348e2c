"""Reading a trained network, its plan and its run config from a checkpoint, without importing Lightning
(or an exported model folder, ``model_folder``, in its place).

A training checkpoint (``pancreas_mtl.training.module.MultiTaskModule``) holds the weights under
``state_dict`` with the prefix ``model.`` and, under ``pancreas_mtl``, the plan (``Plan.to_dict()``)
and the resolved run config (plain containers whose ``model`` entry builds the network). It is read
with ``torch.load(weights_only=True)``, so an untrusted file cannot run code. Lightning's import costs
about 6 s of start-up, which the predictor does not need.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from torch import Tensor

from pancreas_mtl.files import sha256
from pancreas_mtl.inference.model_folder import (MANIFEST, PLAN_FILE, ExportedModel, is_model_folder,
                                                 read_model_folder)
from pancreas_mtl.models.factory import UntrustedConfigError
from pancreas_mtl.models.multitask import MultiTaskNet, build_model
from pancreas_mtl.planning.plan import Plan, PlanError

MODEL_PREFIX = "model."


def checkpoint_problem(path: Path) -> str | None:
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
# version 1 was a bare 'checkpoints:' list of absolute paths: a copied sweep read the original's files
ENSEMBLE_FORMAT = "pancreas_mtl.ensemble/2"


def plan_sha256(plan: Plan) -> str:
    """The SHA-256 of a plan's canonical JSON (sorted keys, no spaces): equal exactly for equal plans."""
    canonical = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read_ensemble_yaml(path: Path) -> dict:
    """The mapping of an ensemble file, read with ``yaml.safe_load`` (plain values only)."""
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as error:
        raise ValueError(f"{path}: refused, it holds a YAML tag that is not a plain value ({error.problem}); "
                         "a python tag could build objects or run code, and an ensemble file lists plain values "
                         "only; rerun pancreas-mtl crossval to write it again") from None
    except yaml.YAMLError as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")
        raise ValueError(f"{path}: not valid YAML ({first_line}); expected an ensemble file written by "
                         "pancreas-mtl crossval") from None
    if isinstance(content, dict) and "format" not in content and "checkpoints" in content:
        raise ValueError(f"{path}: an ensemble file of the old format (a 'checkpoints:' list without digests, "
                         "whose absolute paths a copied sweep still reads from the original folder); rerun "
                         "pancreas-mtl crossval multirun=<the sweep> to write it again, or pass the checkpoints "
                         "themselves: ckpt=[a.ckpt,b.ckpt]")
    if not isinstance(content, dict) or content.get("format") != ENSEMBLE_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: expected an ensemble file with format: {ENSEMBLE_FORMAT}, found {found!r}; "
                         "rerun pancreas-mtl crossval to write it again")
    if not isinstance(content.get("members"), list) or not content["members"] \
            or not isinstance(content.get("plan_sha256"), str):
        raise ValueError(f"{path}: an ensemble file gives 'plan_sha256' and a non-empty 'members' list "
                         f"(checkpoint, sha256, fold each); found plan_sha256={content.get('plan_sha256')!r}, "
                         f"members={content.get('members')!r}")
    return content


def ensemble_members(path: Path) -> list[str]:
    """The member checkpoints of the ensemble file ``path``, each found relative to the file's folder (a
    copied or moved sweep predicts from its own files) and checked before anything is predicted.

    Raises:
        ValueError: naming the file (and the member) for YAML with a python tag, another format (the old
            absolute list included), a malformed member, a member missing, one whose SHA-256 differs from
            the listed one (replaced or changed since crossval wrote the file), or one whose plan is not
            the shared ``plan_sha256``.
    """
    path = path.resolve()  # its folder without symbolic links, so that a member's '..' is that folder's parent
    content = _read_ensemble_yaml(path)
    checkpoints = []
    for number, member in enumerate(content["members"]):
        if not isinstance(member, dict) or not all(isinstance(member.get(k), str) for k in ("checkpoint", "sha256")):
            raise ValueError(f"{path}: member {number} gives 'checkpoint' (a path relative to the file's folder) "
                             f"and 'sha256'; found {member!r}")
        checkpoint = Path(os.path.normpath(path.parent / member["checkpoint"]))
        which = f"member {number} (fold {member.get('fold')}) of {path}"
        if not checkpoint.is_file():
            raise ValueError(f"{checkpoint}: not found; it is {which}, listed as {member['checkpoint']!r} from the "
                             "file's folder (copy the sweep with its job folders, or rerun pancreas-mtl crossval)")
        if sha256(checkpoint) != member["sha256"]:
            raise ValueError(f"{checkpoint}: its SHA-256 differs from the one listed for {which}: the file was "
                             "replaced or changed after crossval wrote the ensemble; rerun pancreas-mtl crossval "
                             "to score and ensemble the checkpoints now in the sweep")
        if plan_sha256(read_checkpoint(checkpoint)[1]) != content["plan_sha256"]:
            raise ValueError(f"{checkpoint}: its plan differs from the ensemble's plan_sha256 ({which}); the "
                             "members of an ensemble share one plan; rerun pancreas-mtl crossval")
        checkpoints.append(str(checkpoint))
    return checkpoints


def expand_checkpoints(paths: Sequence[str | Path]) -> list[str]:
    """``paths`` with every ensemble file and every folder holding ``ensemble.yaml`` replaced by its
    members (``ensemble_members``: checked, relative to the file); other paths are kept as given."""
    expanded: list[str] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
            path = path / ENSEMBLE_FILE
        if path.suffix.lower() not in ENSEMBLE_SUFFIXES or not path.is_file():
            expanded.append(str(given))
            continue
        expanded += ensemble_members(path)
    return expanded


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Plan, dict]:
    """(the model's state dict without the ``model.`` prefix, the plan, the run config) of a checkpoint."""
    path = Path(path)
    problem = checkpoint_problem(path)
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
    return state, Plan.from_dict(saved["plan"], source=f"{path} (its stored plan)"), saved["config"]


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


def load_network(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiTaskNet, Plan, dict]:
    """The trained network (eval mode, the checkpoint's weights), its :class:`Plan` and the run config."""
    state, plan, config = read_checkpoint(path, map_location)
    try:
        model = build_model(config["model"], plan)
    except UntrustedConfigError as error:  # the config names the key; the file is known only here
        raise UntrustedConfigError(f"{path}: {error}") from None
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
        try:
            exported = read_model_folder(path)
        except PlanError as error:
            raise error.in_file(Path(path) / PLAN_FILE) from None
        return exported, exported.plan
    network, plan, _ = load_network(path)
    return network, plan
