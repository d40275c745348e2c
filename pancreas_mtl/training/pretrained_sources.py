"""What ``pretrained=PATH`` names, read into tensors, a plan and the name of its format.

PATH may be:

- one of our training checkpoints (``.ckpt``): the weights under ``state_dict`` (prefix ``model.``), its plan;
- a model folder written by ``pancreas-mtl export`` (its ``manifest.json``): ``weights.pt``, ``plan.json``;
- a plain state dict of our network (``torch.save(net.state_dict())``: a MultiTaskNet's keys, a backbone's
  alone, or a Lightning module's with ``model.``), no plan;
- an nnU-Net v2 checkpoint (``checkpoint_final.pth`` / ``checkpoint_best.pth``): ``network_weights`` in
  nnU-Net's names, the plan from its ``init_args`` where it holds them;
- an nnU-Net v2 model folder (``plans.json``, ``dataset.json``, ``fold_X/``): the fold's checkpoint, the
  plan from its ``plans.json``.

Every file is read with ``torch.load(weights_only=True)`` (nnU-Net's numpy scalars allowed by name, as
``models.nnunet_io`` does), and nothing is built from what it holds: the network is always the one this
run's config describes. The tensors' names are mapped to that network by ``training.warm_start``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pancreas_mtl.files import load_json
from pancreas_mtl.inference.checkpoint import checkpoint_problem, read_checkpoint
from pancreas_mtl.inference.model_folder import MANIFEST, WEIGHTS_FILE, is_model_folder, read_model_folder
from pancreas_mtl.models.nnunet_io import NUMPY_SAFE_GLOBALS, load_nnunet_checkpoint
from pancreas_mtl.models.nnunet_plans import plan_from_nnunet
from pancreas_mtl.planning.plan import Plan

# the formats, by the names pretrained.json records; OURS use this package's parameter names
OUR_CHECKPOINT = "pancreas_mtl checkpoint"
OUR_MODEL_FOLDER = "pancreas_mtl model folder"
OUR_STATE_DICT = "state_dict"
NNUNET_CHECKPOINT = "nnU-Net v2 checkpoint"
NNUNET_MODEL_FOLDER = "nnU-Net v2 model folder"
NNUNET_STATE_DICT = "nnU-Net state_dict"
OURS = (OUR_CHECKPOINT, OUR_MODEL_FOLDER, OUR_STATE_DICT)
NNUNET = (NNUNET_CHECKPOINT, NNUNET_MODEL_FOLDER, NNUNET_STATE_DICT)
WEIGHT_SUFFIXES = (".ckpt", ".pth", ".pt")


class PretrainedSourceError(ValueError):
    """``pretrained.path`` names nothing that holds weights this package can read, and what was found."""


@dataclass
class PretrainedSource:
    """The tensors of a pretrained network as stored, with where they came from.

    Attributes:
        path: what ``pretrained.path`` named.
        file: the file the tensors were read from (hashed into pretrained.json).
        format: one of the format names above.
        weights: name -> tensor, the source's own names (wrapper prefixes ``module.``/``_orig_mod.`` kept).
        plan: the plan (or nnU-Net plans translated to one) the source was trained with; None for a state dict.
        details: what else the source says (nnU-Net fold, configuration, trainer).
    """

    path: Path
    file: Path
    format: str
    weights: dict[str, Tensor]
    plan: Plan | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def nnunet_names(self) -> bool:
        return self.format in NNUNET


def _tensors_only(mapping: Any) -> bool:
    return isinstance(mapping, Mapping) and bool(mapping) and all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in mapping.items())


def _looks_like_nnunet(weights: Mapping[str, Tensor]) -> bool:
    """nnU-Net's networks name their stages ``encoder.stages.*`` and outputs ``decoder.seg_layers.*``."""
    return any(".stages." in key or "seg_layers." in key for key in weights)


def _weight_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES)[:6]


def _nnunet_plan(plans: Mapping, dataset_json: Mapping, configuration: str, source: str) -> Plan:
    return plan_from_nnunet(plans, dataset_json, configuration, source=source)


def _read_nnunet_folder(folder: Path, fold: int | str, checkpoint_name: str) -> PretrainedSource:
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise PretrainedSourceError(f"pretrained.path={folder}: an nnU-Net model folder holds plans.json, "
                                        f"dataset.json and fold_X/; {name} is missing")
    fold_dir = folder / f"fold_{fold}"
    if not fold_dir.is_dir():
        folds = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
        raise PretrainedSourceError(f"pretrained.path={folder}: the nnU-Net model folder has no fold_{fold} "
                                    f"(pretrained.fold={fold}); it holds {folds or 'no fold_X folder'}")
    file = fold_dir / checkpoint_name
    if not file.is_file():
        raise PretrainedSourceError(f"pretrained.path={folder}: {fold_dir.name}/{checkpoint_name} is missing "
                                    f"(pretrained.checkpoint); {fold_dir.name} holds "
                                    f"{_weight_files(fold_dir) or 'no checkpoint'}")
    checkpoint = load_nnunet_checkpoint(file)
    plans, dataset_json = load_json(folder / "plans.json"), load_json(folder / "dataset.json")
    configuration = (checkpoint.get("init_args") or {}).get("configuration") or "3d_fullres"
    plan = _nnunet_plan(plans, dataset_json, configuration, str(folder / "plans.json"))
    return PretrainedSource(folder, file, NNUNET_MODEL_FOLDER, dict(checkpoint["network_weights"]), plan,
                            {"fold": fold, "configuration": configuration,
                             "trainer_name": str(checkpoint.get("trainer_name", ""))})


def _read_our_folder(folder: Path) -> PretrainedSource:
    exported = read_model_folder(folder)  # checks every listed file's SHA-256
    file = folder / WEIGHTS_FILE
    if WEIGHTS_FILE not in exported.manifest.get("sha256", {}):
        raise PretrainedSourceError(
            f"pretrained.path={folder}: this model folder was exported before exports held {WEIGHTS_FILE} (the "
            f"network's tensors); export it again, or warm start from its checkpoint "
            f"({exported.manifest.get('source_checkpoint')})")
    stored = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(stored, Mapping) or not _tensors_only(stored.get("state_dict")):
        raise PretrainedSourceError(f"{file}: expected {{'state_dict': tensors}} as pancreas-mtl export writes it")
    return PretrainedSource(folder, file, OUR_MODEL_FOLDER, dict(stored["state_dict"]), exported.plan,
                            {"source_checkpoint": exported.manifest.get("source_checkpoint")})


def _read_file(file: Path) -> PretrainedSource:
    problem = checkpoint_problem(file)
    if problem:
        raise PretrainedSourceError(f"pretrained.path: {problem}")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            content = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PretrainedSourceError(f"pretrained.path={file}: the file holds objects other than tensors and plain "
                                    "values; it is refused because unpickling them could run code") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise PretrainedSourceError(f"pretrained.path={file}: not a torch checkpoint ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if isinstance(content, Mapping) and "pancreas_mtl" in content:
        state, plan, _ = read_checkpoint(file)
        return PretrainedSource(file, file, OUR_CHECKPOINT, dict(state), plan)
    if isinstance(content, Mapping) and "network_weights" in content:
        checkpoint = load_nnunet_checkpoint(file)  # its own checks and messages
        init_args = checkpoint.get("init_args") or {}
        configuration = init_args.get("configuration") or "3d_fullres"
        plan = None
        if isinstance(init_args.get("plans"), Mapping) and isinstance(init_args.get("dataset_json"), Mapping):
            plan = _nnunet_plan(init_args["plans"], init_args["dataset_json"], configuration,
                                f"{file} (init_args.plans)")
        return PretrainedSource(file, file, NNUNET_CHECKPOINT, dict(checkpoint["network_weights"]), plan,
                                {"fold": init_args.get("fold"), "configuration": configuration,
                                 "trainer_name": str(checkpoint.get("trainer_name", ""))})
    state = content.get("state_dict") if isinstance(content, Mapping) and "state_dict" in content else content
    if _tensors_only(state):
        return PretrainedSource(file, file, NNUNET_STATE_DICT if _looks_like_nnunet(state) else OUR_STATE_DICT,
                                dict(state), None)
    found = sorted(str(k) for k in content)[:8] if isinstance(content, Mapping) else type(content).__name__
    raise PretrainedSourceError(
        f"pretrained.path={file}: holds no weights this package reads: expected a pancreas_mtl checkpoint "
        f"('pancreas_mtl' + 'state_dict'), an nnU-Net checkpoint ('network_weights') or a state dict of tensors; "
        f"found {found}")


def read_pretrained(path: str | Path, fold: int | str, checkpoint_name: str) -> PretrainedSource:
    """The source ``pretrained.path`` names (see the module docstring).

    Args:
        path: a file or folder.
        fold: the fold of an nnU-Net model folder (an int or "all").
        checkpoint_name: the checkpoint of that fold (checkpoint_final.pth or checkpoint_best.pth).

    Raises:
        PretrainedSourceError: a missing path, a folder without a checkpoint, a file that is not a checkpoint,
            an nnU-Net folder without the fold, each saying what was found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PretrainedSourceError(f"pretrained.path={path}: not found"
                                    + (" (a broken symbolic link)" if path.is_symlink() else ""))
    if path.is_dir():
        if is_model_folder(path):
            return _read_our_folder(path)
        if (path / "plans.json").is_file() or any(path.glob("fold_*")):
            return _read_nnunet_folder(path, fold, checkpoint_name)
        found = _weight_files(path)
        raise PretrainedSourceError(
            f"pretrained.path={path}: a folder that is neither a model folder of pancreas-mtl export (its "
            f"{MANIFEST}) nor an nnU-Net model folder (plans.json, dataset.json, fold_X/); "
            + (f"weights inside it: {', '.join(found)}" if found else "it holds no .ckpt, .pth or .pt file"))
    return _read_file(path)
