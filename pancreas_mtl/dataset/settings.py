"""The training data's settings: ``data`` and ``augmentation`` checked against dataclass schemas.

The schemas name every key and its type and hold no values: the values live in the YAML files only,
conf/augmentation/nnunet.yaml (which light.yaml and none.yaml build on with Hydra's defaults list),
conf/data/folder.yaml (which synthetic.yaml builds on) and conf/limits/default.yaml. A config given in code (a test, a notebook) is read
the same way, as changes to those files, so a key it leaves out has the file's value. A key that is
not in the schema, a value of the wrong type, or a key the files lack is an error naming the key.
Code reads the settings under the config's own names (``settings.spatial.rotation_prob``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import MISSING

from pancreas_mtl.config import config_dir

Schema = TypeVar("Schema")


@dataclass
class SpatialSettings:
    enabled: bool = MISSING
    rotation_prob: float = MISSING
    rotation_range_deg: list[float] = MISSING
    scaling_prob: float = MISSING
    scaling_range: list[float] = MISSING
    elastic_prob: float = MISSING
    elastic_scale: list[float] = MISSING
    elastic_magnitude: list[float] = MISSING


@dataclass
class NoiseBlurSettings:
    enabled: bool = MISSING
    noise_prob: float = MISSING
    noise_variance: list[float] = MISSING
    blur_prob: float = MISSING
    blur_sigma: list[float] = MISSING
    blur_prob_per_channel: float = MISSING


@dataclass
class IntensitySettings:
    enabled: bool = MISSING
    brightness_prob: float = MISSING
    brightness_range: list[float] = MISSING
    contrast_prob: float = MISSING
    contrast_range: list[float] = MISSING
    contrast_preserve_range: bool = MISSING


@dataclass
class LowresSettings:
    enabled: bool = MISSING
    prob: float = MISSING
    zoom_range: list[float] = MISSING
    prob_per_channel: float = MISSING


@dataclass
class GammaSettings:
    enabled: bool = MISSING
    prob: float = MISSING
    inverted_prob: float = MISSING
    range: list[float] = MISSING
    retain_stats: bool = MISSING


@dataclass
class MirrorSettings:
    enabled: bool = MISSING
    prob: float = MISSING
    axes: list[int] = MISSING


@dataclass
class AugmentationSettings:
    """The ``augmentation`` config group (conf/augmentation/nnunet.yaml explains every key)."""

    name: str = MISSING
    spatial: SpatialSettings = MISSING
    noise_blur: NoiseBlurSettings = MISSING
    intensity: IntensitySettings = MISSING
    lowres: LowresSettings = MISSING
    gamma: GammaSettings = MISSING
    mirror: MirrorSettings = MISSING
    # name -> a node with _target_ (any MONAI dictionary transform), or null to drop one listed earlier
    extra_transforms: dict[str, Any] = MISSING


@dataclass(frozen=True)
class SamplingSettings:
    """``data.sampling`` (conf/data/folder.yaml explains every key)."""

    oversample_foreground: float = MISSING
    lesion_centred_probability: float = MISSING
    subtype_balanced: bool = MISSING


@dataclass
class InnerValidationSettings:
    cases: Optional[float] = MISSING   # None: 0, or sweep_cases in a run a sweep ranks (training.inner_validation)
    sweep_cases: float = MISSING
    replicate_keys: list[str] = MISSING
    seed: int = MISSING


@dataclass
class DataSettings:
    """The ``data`` config group (conf/data/folder.yaml explains every key). ``synthetic`` is the
    synthetic source's node (conf/data/synthetic.yaml), absent for a folder."""

    source: str = MISSING
    root: str = MISSING
    num_subtypes: int = MISSING
    split: str = MISSING
    fold: int = MISSING
    num_folds: int = MISSING
    split_seed: int = MISSING
    inner_validation: InnerValidationSettings = MISSING
    cache_dir: str = MISSING
    preprocessing_workers: int = MISSING
    fingerprint_samples_per_case: int = MISSING
    progress: bool = MISSING
    shard: Optional[str] = MISSING
    limits: dict[str, Any] = MISSING
    batch_size: Optional[int] = MISSING
    iterations_per_epoch: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    prefetch_factor: int = MISSING
    sampling: dict[str, Any] = MISSING   # checked by sampling_settings
    synthetic: Optional[dict[str, Any]] = None


def data_settings(cfg: DataSettings | Mapping | None) -> DataSettings:
    """A ``data`` config (dict or DictConfig) as checked settings, read as changes to conf/data/folder.yaml
    with conf/limits/default.yaml as its ``limits``; a dict without ``source`` is synthetic when it has a
    ``synthetic`` node (a config written in code). Raises ValueError naming a wrong or missing key."""
    from omegaconf import OmegaConf

    if isinstance(cfg, DataSettings):
        return cfg
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
    cfg.setdefault("source", "synthetic" if cfg.get("synthetic") else "folder")
    base = OmegaConf.load(config_dir() / "data" / "folder.yaml")
    base.pop("defaults", None)
    base.limits = OmegaConf.load(config_dir() / "limits" / "default.yaml")
    settings = _checked(DataSettings, config_dir() / "data" / "folder.yaml", None, cfg, "data", base=base)
    _check_counts(settings)
    return settings


# (key, smallest value, what it counts): counts that a wrong sign or a zero would only break much later,
# e.g. data.batch_size=-1 as "samples_per_epoch must be positive, got -2" in the patch sampler
COUNTS = (("batch_size", 1, "patches per training step; null: the plan's"),
          ("iterations_per_epoch", 1, "optimizer steps per epoch"),
          ("num_workers", 0, "DataLoader worker processes; 0: none"),
          ("preprocessing_workers", 0, "preprocessing processes; 0: none"),
          ("prefetch_factor", 1, "batches each worker loads ahead"),
          ("fingerprint_samples_per_case", 1, "foreground voxels sampled per case"))


def _check_counts(settings: DataSettings) -> None:
    """ValueError naming every ``data`` count below its smallest sensible value, with what it counts."""
    wrong = [f"data.{key}={getattr(settings, key)} ({meaning}): expected a whole number >= {smallest}"
             for key, smallest, meaning in COUNTS
             if getattr(settings, key) is not None and getattr(settings, key) < smallest]
    if wrong:
        raise ValueError("; ".join(wrong) + f" (values in {config_dir() / 'data' / 'folder.yaml'})")


def augmentation_settings(cfg: AugmentationSettings | Mapping | None = None) -> AugmentationSettings:
    """An ``augmentation`` config (dict or DictConfig; None: nnunet.yaml as it is) as checked settings,
    read as changes to conf/augmentation/nnunet.yaml. Raises ValueError naming a wrong or missing key."""
    if isinstance(cfg, AugmentationSettings):
        return cfg
    if isinstance(cfg, Mapping) and "defaults" in cfg:
        raise ValueError("augmentation.defaults: a Hydra defaults list; compose the config with Hydra "
                         "(e.g. compose(overrides=['+augmentation=light'])) rather than loading the file")
    return _checked(AugmentationSettings, config_dir() / "augmentation" / "nnunet.yaml", None, cfg, "augmentation")


def sampling_settings(cfg: SamplingSettings | Mapping | None = None) -> SamplingSettings:
    """A ``data.sampling`` config (dict or DictConfig; None: conf/data/folder.yaml's) as checked settings,
    read as changes to folder.yaml's ``sampling`` section. Raises ValueError naming a wrong or missing key."""
    if isinstance(cfg, SamplingSettings):
        return cfg
    return _checked(SamplingSettings, config_dir() / "data" / "folder.yaml", "sampling", cfg, "data.sampling")


def _checked(schema: type[Schema], path: Path, section: str | None, cfg: Mapping | None, where: str,
             base: Any = None) -> Schema:
    """``schema`` filled from the YAML file at ``path`` (its ``section``; or ``base``, loaded from it), then
    from ``cfg``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    base = OmegaConf.load(path) if base is None else base
    if section is not None:
        base = base[section]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), base, cfg or {}))
    except OmegaConfBaseException as error:
        message = str(getattr(error, "msg", error)).splitlines()[0]
        if isinstance(error, ConfigKeyError):
            message += f"; expected one of {_keys_at(schema, error.full_key)}"
        raise ValueError(f"{where}.{error.full_key}: {message} (values in {path})") from error


def _keys_at(schema: type, full_key: str) -> list[str]:
    """The keys the schema allows beside ``full_key`` (a dotted path)."""
    node = schema
    for part in str(full_key).split(".")[:-1]:
        field_types = {field.name: field.type for field in fields(node)}
        nested = globals().get(str(field_types.get(part)))
        if nested is None or not is_dataclass(nested):
            break
        node = nested
    return sorted(field.name for field in fields(node))
