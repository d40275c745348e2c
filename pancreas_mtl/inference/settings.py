"""The inference settings: one schema for the presets in ``conf/inference/``, read by prediction and validation.

``conf/inference/accurate.yaml`` lists every key; the other presets start from it (Hydra's defaults
list) and list only what differs. :class:`InferenceSettings` is the schema those files compose into:
``predict.py`` reads ``cfg.inference`` and training's validation ``cfg.module.validation`` (any
preset: ``python train.py inference@module.validation=fast``). The schema holds no values (every field
is MISSING): they live in the YAML only. ``InferenceSettings.preset(name)`` reads a preset file, and a
partial mapping given to ``from_config`` is ``accurate.yaml`` with those keys changed, as a preset file is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from omegaconf import MISSING, OmegaConf

from pancreas_mtl.config import config_dir

ENGINES = ("auto", "torch", "openvino", "onnxruntime")  # pancreas_mtl.inference.engines runs them
BASE_PRESET = "accurate"  # the preset that lists every key; the others start from it


def preset_config(name: str) -> dict[str, Any]:
    """The keys of ``conf/inference/<name>.yaml`` as Hydra composes the preset: the presets its defaults
    list names first, then its own keys (``_self_``, last when the list leaves it out).

    Raises:
        ValueError: no such preset (names the ones there are), or a defaults entry other than another
            preset of conf/inference/ or ``_self_``.
    """
    folder = config_dir() / "inference"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"unknown inference preset {name!r}; conf/inference/ has {', '.join(known)}")
    node = OmegaConf.to_container(OmegaConf.load(path))
    defaults = list(node.pop("defaults", None) or [])
    config: dict[str, Any] = {}
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:
        if entry == "_self_":
            config.update(node)
        elif isinstance(entry, str) and entry != name:
            config.update(preset_config(entry))
        else:
            raise ValueError(f"{path}: defaults entry {entry!r}; a preset starts from other presets of "
                             "conf/inference/ (by name) and _self_ only")
    return config


@dataclass
class InferenceSettings:
    """How the windows run (``conf/inference/*.yaml``; see docs/inference.md).

    Attributes:
        name: preset name, for logs and records.
        overlap: share of the window neighbouring windows overlap (step = 1 - overlap; nnU-Net 0.5).
        mirror_axes: spatial axes (0=z, 1=y, 2=x) mirrored for test-time augmentation; () none.
        sigma_scale: Gaussian importance sigma as a share of the window (nnU-Net 1/8).
        sw_batch_size: windows per forward pass.
        roi_size: (z, y, x) window; None: each network's plan patch size.
        shrink_window: along an axis where the case (or the coarse-to-fine box) is smaller than the
            window, use a window just covering it (rounded up to the network's divisibility) instead of
            padding it to the patch size.
        min_lesion_volume: predicted lesion voxels below which windows vote with equal weight.
        coarse_to_fine: run the coarse localisation pass first.
        coarse_factor: (z, y, x) or one factor by which the coarse pass averages the image down.
        coarse_margin_mm: margin around the coarse bounding box, in mm.
        coarse_overlap: window overlap of the coarse pass.
        nnunet_compat: reproduce nnU-Net v2's predictor (``pancreas_mtl.inference.predictor``); not with
            coarse_to_fine.
        engine: what runs the network: ``torch``, ``openvino``, ``onnxruntime`` or ``auto`` (OpenVINO on
            the CPU when installed, else torch; torch on GPUs); see ``pancreas_mtl.inference.engines``.
        max_windows_per_case: most windows one pass of one network may run over a case (mirror passes
            not counted); more is an error naming the case, before the first window. It decides no voxel,
            so an output folder's record leaves it out.
    """

    # no values: they are conf/inference/*.yaml's (accurate.yaml lists every key, in this order)
    name: str = MISSING
    overlap: float = MISSING
    mirror_axes: tuple[int, ...] = MISSING
    sigma_scale: float = MISSING
    sw_batch_size: int = MISSING
    roi_size: tuple[int, int, int] | None = MISSING
    shrink_window: bool = MISSING
    min_lesion_volume: float = MISSING
    coarse_to_fine: bool = MISSING
    coarse_factor: tuple[float, float, float] = MISSING
    coarse_margin_mm: float = MISSING
    coarse_overlap: float = MISSING
    nnunet_compat: bool = MISSING
    engine: str = MISSING
    max_windows_per_case: int = MISSING

    def __post_init__(self) -> None:
        missing = [f.name for f in fields(self) if isinstance(getattr(self, f.name), str)
                   and getattr(self, f.name) == MISSING]
        if missing:
            raise TypeError(f"InferenceSettings needs every key, {missing} not given; the values live in "
                            "conf/inference/: InferenceSettings.preset(name) or .from_config(mapping) reads them")

    @classmethod
    def preset(cls, name: str) -> InferenceSettings:
        """The settings of ``conf/inference/<name>.yaml`` (``accurate``, ``fast``, ``fastest``, ``nnunet``,
        ``validation``), checked; ValueError for an unknown preset."""
        return cls.from_config(preset_config(name))

    @classmethod
    def from_config(cls, config: Mapping | None) -> InferenceSettings:
        """Settings from a composed preset (``cfg.inference``, ``cfg.module.validation``) or any mapping of
        its keys (the others: conf/inference/accurate.yaml's); ValueError for an unknown key or a value out
        of range."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown inference setting(s) {unknown}; known: {sorted(known)}")
        if set(config) != known:  # a partial mapping: changes to the preset that lists every key
            config = {**preset_config(BASE_PRESET), **config}
        if "mirror_axes" in config:
            config["mirror_axes"] = tuple(int(a) for a in config["mirror_axes"] or ())
        if config.get("roi_size") is not None:
            config["roi_size"] = tuple(int(s) for s in config["roi_size"])
        if "coarse_factor" in config:
            factor = config["coarse_factor"]
            factor = [factor] * 3 if isinstance(factor, (int, float)) else list(factor)
            if len(factor) != 3 or min(factor) < 1:
                raise ValueError(f"coarse_factor must be one number or a (z, y, x) triple, each >= 1, got {factor}")
            config["coarse_factor"] = tuple(float(f) for f in factor)
        settings = cls(**config)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ValueError naming every setting out of range (before any case is predicted)."""
        problems = []
        if not 0 <= self.overlap < 1 or not 0 <= self.coarse_overlap < 1:
            problems.append(f"overlap must be in [0, 1), got {self.overlap} / coarse {self.coarse_overlap}")
        if isinstance(self.sw_batch_size, bool) or not isinstance(self.sw_batch_size, int) or self.sw_batch_size < 1:
            problems.append(f"sw_batch_size must be a whole number >= 1, got {self.sw_batch_size!r}")
        if any(axis not in (0, 1, 2) for axis in self.mirror_axes) or len(set(self.mirror_axes)) != len(self.mirror_axes):
            problems.append("mirror_axes must be spatial axes 0 (z), 1 (y), 2 (x) without repeats, got "
                            f"{list(self.mirror_axes)}")
        if not self.sigma_scale > 0:
            problems.append(f"sigma_scale must be > 0, got {self.sigma_scale}")
        if self.roi_size is not None and (len(self.roi_size) != 3 or min(self.roi_size) < 1):
            problems.append(f"roi_size must be null or three window sizes (z, y, x) >= 1, got {list(self.roi_size)}")
        if not self.min_lesion_volume >= 0:
            problems.append(f"min_lesion_volume must be >= 0, got {self.min_lesion_volume}")
        if not self.coarse_margin_mm >= 0:
            problems.append(f"coarse_margin_mm must be >= 0, got {self.coarse_margin_mm}")
        if (isinstance(self.max_windows_per_case, bool) or not isinstance(self.max_windows_per_case, int)
                or self.max_windows_per_case < 1):
            problems.append(f"max_windows_per_case must be a whole number >= 1, got {self.max_windows_per_case!r}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.nnunet_compat and self.coarse_to_fine:
            problems.append("nnunet_compat reproduces nnU-Net's predictor, which has no coarse-to-fine pass; "
                            "set coarse_to_fine: false")
        if problems:
            raise ValueError(f"inference settings ({self.name}): " + "; ".join(problems))

    def to_dict(self) -> dict:
        """Every field (tuples kept), as the output folder's records compare them."""
        return asdict(self)

    def to_config(self) -> dict:
        """Every field as plain YAML values (lists for tuples): what :meth:`from_config` reads back."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.to_dict().items()}
