"""Warm start: a pretrained network's tensors loaded into this run's network, every one accounted for.

``pretrained.path`` names the source (``training.pretrained_sources``); ``pretrained.parts`` what is loaded:

- ``encoder``: the stem and the encoder stages;
- ``encoder_decoder`` (the default): the encoder and the decoder, not the segmentation outputs nor the
  classification head (the target's labels and subtypes are its own);
- ``backbone``: the whole segmentation network, outputs included (a segmentation run's checkpoint, for the
  multi-task phase of the two-phase recipe);
- ``all``: everything, the classification head too.

Each tensor of the network is matched by name and shape through one explicit mapping per source format:
our own names for our checkpoints, model folders and state dicts (less ``module.``/``_orig_mod.``/
``model.`` wrappers; a bare backbone's keys under ``backbone.``), nnU-Net's names through
``models.nnunet_weights.nnunet_key_aliases`` for nnU-Net's checkpoints. A tensor whose shape differs only
because the input channel count (the first convolution's input dimension), the label count (the
segmentation outputs' first dimension) or the subtype count (a head tensor's subtype dimension) changed
keeps this network's fresh initialisation, as nnU-Net does. Anything else that does not fit, in the parts
asked for, is an error naming the tensors: a load is complete or it does not happen.

The record of it all is ``pretrained.json`` in the run folder: each tensor loaded, skipped or
re-initialised, with the reason, and the source file's SHA-256.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pancreas_mtl.files import save_json, sha256
from pancreas_mtl.models.multitask import MultiTaskNet
from pancreas_mtl.models.nnunet_weights import nnunet_key_aliases
from pancreas_mtl.training.pretrained_sources import PretrainedSource

log = logging.getLogger(__name__)

REPORT_FILE = "pretrained.json"
REPORT_FORMAT = "pancreas_mtl.pretrained/1"
# which parts of the network each pretrained.parts value loads
PARTS = {
    "encoder": ("encoder",),
    "encoder_decoder": ("encoder", "decoder"),
    "backbone": ("encoder", "decoder", "seg_outputs"),
    "all": ("encoder", "decoder", "seg_outputs", "head"),
}
OUR_PREFIXES = (("backbone.stem.", "encoder"), ("backbone.encoder.", "encoder"), ("backbone.decoder.", "decoder"),
                ("backbone.seg_heads.", "seg_outputs"), ("head.", "head"))
BACKBONE_KEYS = ("stem.", "encoder.", "decoder.", "seg_heads.")
WRAPPERS = ("module.", "_orig_mod.", "model.")
SHOWN = 6


class PretrainedMismatchError(ValueError):
    """The pretrained tensors do not fit this run's network, in the parts asked for; names them."""


def part_of(key: str) -> str:
    """The part of a MultiTaskNet parameter: encoder, decoder, seg_outputs, head (or other)."""
    return next((part for prefix, part in OUR_PREFIXES if key.startswith(prefix)), "other")


def _nnunet_part(key: str) -> str:
    """The part of an nnU-Net parameter name (its decoder holds a second reference to the encoder)."""
    if key.startswith(("encoder.", "decoder.encoder.")):
        return "encoder"
    return "seg_outputs" if key.startswith("decoder.seg_layers.") else "decoder"


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def name_mapping(source: PretrainedSource, network: MultiTaskNet) -> tuple[dict[str, str], dict[str, str]]:
    """(this network's key -> the source's key for every tensor the source holds, the part of each source
    key that no network key maps to): the source format's one mapping."""
    if source.nnunet_names:
        unwrapped = {_unwrapped(key): key for key in source.weights}
        mapping, used = {}, set()
        for key, aliases in nnunet_key_aliases(network.backbone).items():
            used.update(aliases)
            found = next((alias for alias in aliases if alias in unwrapped), None)
            if found is not None:
                mapping[f"backbone.{key}"] = unwrapped[found]
        unused = {original: _nnunet_part(key) for key, original in unwrapped.items() if key not in used}
        return mapping, unused
    unwrapped = {_unwrapped(key): key for key in source.weights}
    if unwrapped and all(key.startswith(BACKBONE_KEYS) for key in unwrapped):  # a backbone's own state dict
        unwrapped = {f"backbone.{key}": original for key, original in unwrapped.items()}
    target = network.state_dict()
    mapping = {key: unwrapped[key] for key in target if key in unwrapped}
    unused = {original: part_of(key) for key, original in unwrapped.items() if key not in target}
    return mapping, unused


def _first_conv(network: MultiTaskNet) -> str:
    """The key of the convolution that reads the input image."""
    names = network.state_dict()
    return next(key for key in ("backbone.stem.conv.weight", "backbone.encoder.0.0.conv.weight") if key in names)


def reinit_reason(key: str, source_shape: tuple, shape: tuple, network: MultiTaskNet, first_conv: str) -> str | None:
    """Why a tensor of another shape keeps its fresh initialisation (a count that changed), or None."""
    if len(source_shape) != len(shape):
        return None
    differing = [d for d in range(len(shape)) if source_shape[d] != shape[d]]
    if key == first_conv and differing == [1]:
        return f"input channels: {source_shape[1]} in the source, {shape[1]} here"
    if part_of(key) == "seg_outputs" and differing == [0]:
        return f"labels: {source_shape[0]} in the source, {shape[0]} here"
    subtypes = network.head.num_subtypes if network.head is not None else None
    if part_of(key) == "head" and differing and all(shape[d] == subtypes for d in differing):
        return f"subtypes: {[source_shape[d] for d in differing][0]} in the source, {subtypes} here"
    return None


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


@dataclass
class WarmStart:
    """What a warm start loaded into a network: the record pretrained.json holds.

    Attributes:
        source: the source read.
        parts: the pretrained.parts value.
        loaded: this network's keys that took the source's tensor (with the source's name and the shape).
        reinitialised: keys that kept their fresh initialisation, with the reason.
        skipped: keys of either side that were not loaded, with the reason.
    """

    source: PretrainedSource
    parts: str
    loaded: list[dict[str, Any]] = field(default_factory=list)
    reinitialised: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loaded_names(self) -> set[str]:
        return {entry["name"] for entry in self.loaded}

    def report(self) -> dict:
        """pretrained.json's content."""
        return {"format": REPORT_FORMAT, "source": str(self.source.path), "file": str(self.source.file),
                "source_format": self.source.format, "sha256": sha256(self.source.file), "parts": self.parts,
                "details": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                            for k, v in self.source.details.items()},
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": {"loaded": len(self.loaded), "reinitialised": len(self.reinitialised),
                           "skipped": len(self.skipped)},
                "loaded": self.loaded, "reinitialised": self.reinitialised, "skipped": self.skipped}


def match(network: MultiTaskNet, source: PretrainedSource, parts: str) -> tuple[WarmStart, dict[str, Tensor]]:
    """The warm start of ``network`` from ``source`` and the tensors to load, by name.

    Raises:
        ValueError: an unknown ``parts``.
        PretrainedMismatchError: tensors of the parts asked for that the source lacks, holds in another shape
            (other than a changed count), or holds beyond this network, each named.
    """
    if parts not in PARTS:
        raise ValueError(f"pretrained.parts={parts!r}: expected one of {', '.join(PARTS)}")
    wanted = PARTS[parts]
    mapping, unused = name_mapping(source, network)
    first_conv = _first_conv(network)
    result, state = WarmStart(source, parts), {}
    missing, reshaped, extra = [], [], []
    for key, tensor in network.state_dict().items():
        found, shape = mapping.get(key), tuple(tensor.shape)
        if part_of(key) not in wanted:
            reason = f"not in pretrained.parts={parts} ({part_of(key)})"
            result.skipped.append({"name": key, "source_name": found, "reason": reason})
            continue
        if found is None:
            missing.append(key)
            continue
        source_shape = tuple(source.weights[found].shape)
        if source_shape == shape:
            state[key] = source.weights[found]
            result.loaded.append({"name": key, "source_name": found, "shape": list(shape)})
            continue
        reason = reinit_reason(key, source_shape, shape, network, first_conv)
        if reason is None:
            reshaped.append(f"{key} {list(shape)} <- {found} {list(source_shape)}")
            continue
        result.reinitialised.append({"name": key, "source_name": found, "shape": list(shape),
                                     "source_shape": list(source_shape), "reason": reason})
    for found, part in sorted(unused.items()):
        if part in wanted:
            extra.append(found)
        else:
            result.skipped.append({"name": None, "source_name": found,
                                   "reason": f"source tensor outside pretrained.parts={parts} ({part})"})
    if missing or reshaped or extra:
        raise PretrainedMismatchError(_mismatch_message(network, source, parts, missing, reshaped, extra))
    return result, state


def _mismatch_message(network: MultiTaskNet, source: PretrainedSource, parts: str, missing: list[str],
                      reshaped: list[str], extra: list[str]) -> str:
    problems = [f"{len(items)} {what}: {_listed(items)}" for what, items in
                (("missing from the source", missing), ("of another shape (this network <- source)", reshaped),
                 ("in the source but not in this network", extra)) if items]
    hints = []
    source_network = source.plan.network if source.plan is not None and hasattr(source.plan, "network") else None
    own = getattr(network.backbone, "network", None)
    if source_network and own and source_network != own:
        hints.append(f"the source is a {source_network} network and this run builds a {own} one: "
                     f"model/backbone={source_network}")
    if missing and all(part_of(key) == "head" for key in missing):
        hints.append("the source has no classification head: pretrained.parts=backbone loads all but the head")
    elif missing and all(part_of(key) == "seg_outputs" for key in missing):
        hints.append("the source has no segmentation outputs of its own: pretrained.parts=encoder_decoder")
    elif reshaped or extra or missing:
        hints.append("the source's topology (stages, features, kernels) differs from this run's plan: "
                     "planning=from_pretrained takes the source's")
    return (f"{source.file} ({source.format}): the pretrained weights do not fit this run's network "
            f"(pretrained.parts={parts}); nothing was loaded.\n  " + "\n  ".join(problems)
            + ("\n  " + "; ".join(hints) if hints else ""))


@torch.no_grad()
def warm_start(network: MultiTaskNet, source: PretrainedSource, parts: str) -> WarmStart:
    """Load the matched tensors of ``source`` into ``network`` (see :func:`match`); returns the record."""
    result, state = match(network, source, parts)
    own = network.state_dict()
    for key, tensor in state.items():
        own[key].copy_(tensor.to(own[key].dtype))
    log.info("warm start from %s (%s, parts=%s): %d tensors loaded, %d re-initialised, %d skipped",
             source.path, source.format, parts, len(result.loaded), len(result.reinitialised), len(result.skipped))
    for entry in result.reinitialised:
        log.info("  re-initialised %s: %s", entry["name"], entry["reason"])
    return result


def write_report(result: WarmStart, run_dir: str | Path) -> Path:
    """``<run folder>/pretrained.json`` (atomically)."""
    return save_json(result.report(), Path(run_dir) / REPORT_FILE)


def read_loaded_names(run_dir: str | Path) -> set[str] | None:
    """The parameter names an earlier start of this run folder loaded (its pretrained.json), None if none."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        return None
    from pancreas_mtl.files import load_json

    content = load_json(path)
    if not isinstance(content, Mapping) or content.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: not a pretrained.json this package wrote (format {content.get('format')!r})")
    return {str(entry["name"]) for entry in content.get("loaded", [])}
