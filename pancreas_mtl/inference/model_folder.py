"""A deployable model folder: the network as ONNX (and OpenVINO IR) with its plan, run without the checkpoint.

``pancreas-mtl export ckpt=... out=...`` writes it; ``predict.py ckpt=<folder>`` runs it with OpenVINO or
ONNX Runtime (no training checkpoint, no torch network built). The folder is recognised by its
``manifest.json`` alone and nothing is built from its contents but through the manifest's explicit
fields (format, version, window shape, head metadata, file digests); torch is needed only for the
sliding windows around the engine.

    manifest.json   format, version, files and their SHA-256, window shape (B, C, Z, Y, X), engine and
                    precision, head (num_subtypes, loss_kind, how probabilities are computed), lesion
                    channel, output names, weights digest, source checkpoint, verification figures
    plan.json       the checkpoint's plan (preprocessing, spacing, labels, patch)
    model.onnx      the network for that window shape (onnx_graph.WindowNetwork)
    model.xml/.bin  engine=openvino: the same network as OpenVINO IR (read faster than ONNX)
    weights.pt      the network's state dict (tensors only, read with weights_only): what a warm start
                    (``pretrained=<folder>``) loads; folders exported before it existed lack it

The export writes only into an empty or new folder or over its own earlier export (``overwrite=true``
removes the files its manifest lists, nothing else); a folder holding anything else is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import torch

from pancreas_mtl.files import atomic_path, load_json, save_json, sha256
from pancreas_mtl.inference.engines import (
    INSTALL_HINT,
    EngineNetwork,
    EngineUnavailable,
    import_engine,
    resolve_engine,
    resolve_engine_precision,
)
from pancreas_mtl.inference.onnx_graph import export_onnx, output_names
from pancreas_mtl.models.heads import ClassificationHead, OneVsRestHead
from pancreas_mtl.models.multitask import MultiTaskNet
from pancreas_mtl.output_guard import (
    changed_files,
    describe_paths,
    foreign_entries,
    listed_files,
    read_manifest,
    refuse_reads,
    remove_listed,
    write_manifest,
)
from pancreas_mtl.planning.plan import LESION_LABEL, Plan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "pancreas_mtl model folder"
VERSION = 1
ONNX_FILE, IR_FILE, IR_WEIGHTS, PLAN_FILE = "model.onnx", "model.xml", "model.bin", "plan.json"
WEIGHTS_FILE = "weights.pt"
REQUIRED_FIELDS = ("window_shape", "engine", "precision", "head", "lesion_channel", "outputs", "weights_digest")
# how class probabilities come from the class logits, per head loss (models.heads: probabilities)
PROBABILITY_HEADS = {"ce": ClassificationHead, "bce": OneVsRestHead}
PROBABILITY_RULES = {"ce": "softmax", "bce": "sigmoid, normalised to sum to 1"}


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``manifest.json``: a model folder to open with
    :func:`read_model_folder`, which says what is wrong with a manifest it cannot read or of another format."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def class_probabilities_for(loss_kind: str | None, num_subtypes: int):
    """(B, S) class logits -> probabilities as the head of ``loss_kind`` defines them; None without a head."""
    if loss_kind is None:
        return None
    if loss_kind not in PROBABILITY_HEADS:
        raise ValueError(f"unknown head loss kind {loss_kind!r}; known: {sorted(PROBABILITY_HEADS)}")
    head = PROBABILITY_HEADS[loss_kind]([1], num_subtypes)  # only its probabilities() is used
    return head.probabilities


@dataclass
class ExportedModel:
    """A model folder read through its manifest: what the predictor needs to run it with an engine."""

    folder: Path
    manifest: dict
    plan: Plan

    @property
    def window_shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.manifest["window_shape"])

    @property
    def digest(self) -> str:
        return str(self.manifest["weights_digest"])

    def model_file(self, window_shape: Sequence[int], engine: str) -> Path:
        """The file ``engine`` reads for ``window_shape``; ValueError for a shape the folder was not exported for."""
        if tuple(window_shape) != self.window_shape:
            raise ValueError(f"{self.folder}: the model was exported for windows {list(self.window_shape)} "
                             f"(B, C, Z, Y, X), asked for {list(window_shape)}; export again with that "
                             "roi_size / sw_batch_size, or predict from the training checkpoint")
        if engine == "openvino" and IR_FILE in self.manifest["files"]:
            return self.folder / IR_FILE
        return self.folder / ONNX_FILE

    def engine_network(self, engine: str, precision: str, threads: int | None = None,
                       compiled_cache: str | Path | None = None) -> EngineNetwork:
        """The folder's network on ``engine``; ``precision`` ``auto`` takes the folder's own (its manifest)."""
        precision = resolve_engine_precision(self.manifest["precision"] if precision == "auto" else precision, engine)
        head = self.manifest["head"]
        return EngineNetwork(engine, precision, self.window_shape[0], lambda shape: self.model_file(shape, engine),
                             class_probabilities_for(head["loss_kind"], int(head["num_subtypes"])), threads,
                             compiled_cache)


def _opened_manifest(folder: Path) -> dict:
    """The folder's manifest; ValueError naming it when it is missing, not a JSON object, or of another format."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder}: not a model folder (no {MANIFEST}); pancreas-mtl export writes one") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a JSON object ({type(error).__name__}: {error}); copy or export the "
                         "folder again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object (found a {type(manifest).__name__}); copy or export the "
                         "folder again")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}: not the manifest of a "
                         "model folder written by pancreas-mtl export")
    return manifest


def _leaves(folder: Path, name: str) -> str | None:
    """How the relative POSIX path ``name`` leads out of ``folder`` (absolute, through ``..``, a link out
    of it); None when it stays inside."""
    pure = PurePosixPath(name)
    if not pure.parts or pure.is_absolute() or "\\" in name:
        return "not a relative path"
    if ".." in pure.parts:
        return "through '..'"
    target = (folder / name).resolve()
    return None if target.is_relative_to(folder.resolve()) else f"{folder / name} links to {target}"


def _check_listed_inside(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists is a path inside the folder that stays there (no link out of it)."""
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ValueError(f"{folder / MANIFEST}: 'files' is {listed!r}, expected a list of the folder's file names; "
                         "export the checkpoint again")
    for name in [*listed, *manifest["sha256"]]:
        how = _leaves(folder, name)
        if how:
            raise ValueError(f"{folder / MANIFEST}: lists {name!r}, a path outside the model folder ({how}); a "
                             "model folder is read only inside itself: copy or export the folder again")


def _check_external_data(folder: Path, digested: set[str]) -> None:
    """Weights that model.onnx keeps in external data files must be files of the folder with a digest in the
    manifest: listed from the graph (onnx.external_data_helper), the weights not loaded."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    except ImportError:
        raise EngineUnavailable(f"{folder}: opening a model folder needs the onnx package: {INSTALL_HINT}") from None
    path = folder / ONNX_FILE
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ValueError(f"{path}: cannot read it as ONNX ({type(error).__name__}: {error}); export the checkpoint "
                         "again") from None
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        how = _leaves(folder, location)
        if how:
            raise ValueError(f"{path}: weight {tensor.name!r} is read from external data at {location!r}, outside "
                             f"the model folder ({how}); the folder is refused (an export keeps its weights inside "
                             "it): export the checkpoint again")
        if location not in digested:
            raise ValueError(f"{path}: weight {tensor.name!r} is read from external data {location!r}, a file not "
                             f"listed in {MANIFEST} with its SHA-256; export the checkpoint again")


def read_model_folder(path: str | Path) -> ExportedModel:
    """The model folder at ``path``; ValueError naming the folder and the file for an unreadable manifest,
    a wrong format or version, a missing file, a file whose SHA-256 differs from the manifest's (a partial
    copy), or a path that leads outside the folder (a listed file, ONNX external data)."""
    folder = Path(path)
    manifest = _opened_manifest(folder)
    if manifest.get("version") != VERSION:
        raise ValueError(f"{folder / MANIFEST}: model folder version {manifest.get('version')!r}, this code reads "
                         f"version {VERSION}; export the checkpoint again")
    if not manifest.get("complete") or not isinstance(manifest.get("sha256"), dict):
        raise ValueError(f"{folder}: the export that wrote it did not finish ({MANIFEST} is not complete); "
                         "export the checkpoint again")
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise ValueError(f"{folder / MANIFEST}: lacks {missing}; export the checkpoint again")
    optional = {IR_FILE, IR_WEIGHTS, WEIGHTS_FILE}
    if set(manifest["sha256"]) != {ONNX_FILE, PLAN_FILE} | (optional & set(manifest["sha256"])):
        raise ValueError(f"{folder / MANIFEST}: its digests list {sorted(manifest['sha256'])}, expected "
                         f"{ONNX_FILE}, {PLAN_FILE} and optionally {IR_FILE}/{IR_WEIGHTS}, {WEIGHTS_FILE}")
    _check_listed_inside(folder, manifest)
    for name, expected in manifest["sha256"].items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if sha256(file) != expected:
            raise ValueError(f"{file}: its SHA-256 differs from the one in {MANIFEST} (a partial copy or an "
                             "edited file); copy or export the folder again")
    _check_external_data(folder, set(manifest["sha256"]))
    return ExportedModel(folder, manifest, Plan.from_dict(load_json(folder / PLAN_FILE)))


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """The files of an earlier export in ``out`` to replace ([] for a new or empty folder). Raises
    FileExistsError for a folder holding anything the export did not write, or an earlier export
    without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder to export the model into")
    manifest = read_manifest(out / MANIFEST)
    listed = listed_files(manifest) if manifest is not None and manifest.get("format") == FORMAT else None
    ours = listed is not None
    foreign = foreign_entries(out, listed or [], MANIFEST) if out.is_dir() else []
    if not ours and (out / MANIFEST).exists():
        foreign.insert(0, MANIFEST)  # someone else's manifest.json
    if foreign:
        why = f"not listed in its {MANIFEST}" if ours else f"it has no {MANIFEST} of an earlier export"
        raise FileExistsError(f"{out}: holds {len(foreign)} file(s) or folder(s) the export did not write ({why}): "
                              f"{describe_paths(foreign)}. The export writes only into an empty or new folder or "
                              "over its own earlier export; choose another folder")
    changed = changed_files(out, manifest.get("sha256")) if ours else []
    if changed:
        raise FileExistsError(f"{out}: {describe_paths(changed)} changed after the export wrote them (edited by "
                              "hand?): they are the user's and never replaced, with or without overwrite: move them "
                              "out, or choose another folder")
    if ours and not overwrite:
        raise FileExistsError(f"{out}: holds an earlier export (of {manifest.get('source_checkpoint')}); "
                              "overwrite=true replaces it (only the files its manifest lists)")
    return listed or []


@torch.no_grad()
def verify_export(network: MultiTaskNet, engine_network: EngineNetwork, window_shape: Sequence[int]) -> dict:
    """One random window (seeded) through the checkpoint in torch fp32 and through the exported model:
    the share of voxels whose argmax agrees, the largest absolute logit difference, and of class
    probabilities when there is a head."""
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(tuple(window_shape), generator=generator)
    unet = network.backbone(windows, deep_supervision=False)
    reference = unet.seg_logits[0]
    seg_logits, probabilities = engine_network(windows)
    figures = {"argmax_agreement": float((seg_logits.argmax(1) == reference.argmax(1)).float().mean()),
               "max_abs_logit_difference": float((seg_logits - reference).abs().max())}
    if network.head is not None:
        expected = network.class_probabilities(network.classify(unet, windows))
        figures["max_abs_probability_difference"] = float((probabilities - expected).abs().max())
    return figures


def export_model_folder(checkpoint: str | Path, network: MultiTaskNet, plan: Plan, out: str | Path, *,
                        engine: str = "openvino", precision: str = "auto", sw_batch_size: int = 2,
                        roi_size: Sequence[int] | None = None, verify: bool = True, overwrite: bool = False,
                        weights_digest: str = "") -> Path:
    """Write the model folder of ``network`` (read from ``checkpoint``) into ``out``; see the module docstring.

    Args:
        engine: ``openvino`` (model.onnx and its OpenVINO IR) or ``onnxruntime`` (model.onnx).
        precision: the folder's default engine precision (``auto``, ``bf16``, ``fp32``), used when
            predict.py's ``precision`` is ``auto``.
        sw_batch_size, roi_size: the windows (B and (Z, Y, X)) the model is exported for; roi_size None:
            the plan's patch size.
        verify: run one window through the exported model and compare it with torch fp32 (an fp32 export
            agreeing on less than 99.9% of the voxels' argmax is an error).

    Raises FileExistsError for a folder the export may not write into (``_check_out``).
    """
    out = Path(out).expanduser()
    if engine not in ("openvino", "onnxruntime"):
        raise ValueError(f"engine must be openvino or onnxruntime for an exported model, got {engine!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32 for an exported model, got {precision!r}")
    resolve_engine(engine, torch.device("cpu"))  # EngineUnavailable names the extra to install
    resolve_engine_precision(precision, engine)  # ValueError for bf16 with onnxruntime, before any file
    window = tuple(int(s) for s in (roi_size or plan.patch_size))
    window_shape = (int(sw_batch_size), plan.num_input_channels, *window)
    refuse_reads(out, [checkpoint])
    earlier = _check_out(out, overwrite)
    network = network.cpu().eval()
    files = [ONNX_FILE, PLAN_FILE, WEIGHTS_FILE] + ([IR_FILE, IR_WEIGHTS] if engine == "openvino" else [])
    head = {"num_subtypes": 0 if network.head is None else network.head.num_subtypes,
            "loss_kind": network.loss_kind,
            "probabilities": PROBABILITY_RULES.get(network.loss_kind) if network.head is not None else None}
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "files": sorted({*earlier, *files}),
                "source_checkpoint": str(checkpoint)}
    if earlier:  # list old and new files first: a run killed while removing still knows both
        write_manifest(out / MANIFEST, manifest)
        remove_listed(out, earlier, MANIFEST)
    manifest["files"] = sorted(files)
    write_manifest(out / MANIFEST, manifest)
    export_onnx(network, window_shape, out / ONNX_FILE)
    if engine == "openvino":
        openvino = import_engine("openvino")
        model = openvino.convert_model(str(out / ONNX_FILE))
        with atomic_path(out / IR_FILE, suffix=".xml") as tmp:
            openvino.save_model(model, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(out / IR_WEIGHTS)  # the weights first: the .xml names them
    save_json(plan.to_dict(), out / PLAN_FILE)
    with atomic_path(out / WEIGHTS_FILE, suffix=".pt") as tmp:  # tensors only: a warm start reads them
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}}, tmp)
    manifest.update({
        "window_shape": list(window_shape), "engine": engine, "precision": precision, "head": head,
        "lesion_channel": int(plan.labels.get("lesion", LESION_LABEL)), "outputs": output_names(network),
        "input": "windows (B, C, Z, Y, X) float32, preprocessed as plan.json says; axes (z, y, x)",
        "weights_digest": weights_digest, "torch": torch.__version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": {name: sha256(out / name) for name in sorted(files)},
    })
    if verify:
        exported = ExportedModel(out, manifest, plan).engine_network(engine, precision)
        figures = verify_export(network, exported, window_shape)
        manifest["verification"] = {"precision": exported.precision, **figures}
        log.info("export check (%s %s against torch fp32): %s", engine, exported.precision, figures)
        if exported.precision == "fp32" and figures["argmax_agreement"] < 0.999:
            raise ValueError(f"{out}: the exported model's argmax agrees with torch on only "
                               f"{figures['argmax_agreement']:.4f} of a window's voxels at fp32")
    manifest["complete"] = True
    write_manifest(out / MANIFEST, manifest)
    return out
