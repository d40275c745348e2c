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


# Command-line keys that stand for one key of their block: ``pretrained=PATH`` is ``pretrained.path=PATH``
# (the block's other keys, pretrained.parts and so on, keep their values).
SHORTHAND_KEYS = {"pretrained": "pretrained.path"}


def expand_shorthands(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Hydra overrides with each ``SHORTHAND_KEYS`` key (also with ``+``/``++``/``~``) written out in full."""
    expanded = []
    for override in overrides:
        key, equals, value = str(override).partition("=")
        prefix = key[:len(key) - len(key.lstrip("+~"))]
        if equals and key[len(prefix):] in SHORTHAND_KEYS and prefix in ("", "+", "++"):
            override = f"{prefix}{SHORTHAND_KEYS[key[len(prefix):]]}={value}"
        expanded.append(override)
    return expanded


def config_dir() -> Path:
    """The folder of the package's Hydra configs: the repository's ``conf/`` in a source checkout or an
    editable install, the ``pancreas_mtl/conf`` package data in a wheel."""
    return Path(str(resources.files("pancreas_mtl.conf")))


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
