"""The inference settings: one schema for the presets in ``conf/inference/``, read by prediction and validation.

``conf/inference/accurate.yaml`` lists every key; the other presets start from it (Hydra's defaults
list) and list only what differs. :class:`InferenceSettings` is the schema those files compose into:
``predict.py`` reads ``cfg.inference`` and training's validation ``cfg.module.validation`` (any
preset: ``python train.py inference@module.validation=fast``). Its defaults are accurate.yaml's (a test
keeps them equal), so a partial mapping is ``accurate`` with those keys changed, as a preset file is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

ENGINES = ("auto", "torch", "openvino", "onnxruntime")  # pancreas_mtl.inference.engines runs them


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

    # the values of conf/inference/accurate.yaml (tests/test_predict_command.py checks it)
    name: str = "accurate"
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    sigma_scale: float = 0.125
    sw_batch_size: int = 2
    roi_size: tuple[int, int, int] | None = None
    shrink_window: bool = False
    min_lesion_volume: float = 0.5
    coarse_to_fine: bool = False
    coarse_factor: tuple[float, float, float] = (2.0, 2.0, 2.0)
    coarse_margin_mm: float = 20.0
    coarse_overlap: float = 0.25
    nnunet_compat: bool = False
    engine: str = "auto"
    max_windows_per_case: int = 100_000

    @classmethod
    def from_config(cls, config: Mapping | None) -> InferenceSettings:
        """Settings from a composed preset (``cfg.inference``, ``cfg.module.validation``) or any mapping of
        its keys (the others: accurate's); ValueError for an unknown key or a value out of range."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown inference setting(s) {unknown}; known: {sorted(known)}")
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
