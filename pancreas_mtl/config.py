"""Config helpers shared by every layer: plain containers from Hydra/OmegaConf nodes, and the package's
own config folder (``conf/``, installed as the ``pancreas_mtl.conf`` package data)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any


def plain(config: Any) -> Any:
    """``config`` as plain Python containers: an OmegaConf node resolved to dicts and lists, None as {},
    any other mapping as a dict, anything else unchanged."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return config


def config_dir() -> Path:
    """The folder of the package's Hydra configs: the repository's ``conf/`` in a source checkout or an
    editable install, the ``pancreas_mtl/conf`` package data in a wheel."""
    return Path(str(resources.files("pancreas_mtl.conf")))
