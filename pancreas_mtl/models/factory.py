"""Building the network's parts from config entries through an allowlist of this package's classes.

A model config (``conf/model/``, and the copy every checkpoint carries) names its backbone and head by
``_target_``. Hydra's ``instantiate`` would import whatever a name points to and follow nested
``_target_`` nodes, so a checkpoint's stored config could run code on load even with
``torch.load(weights_only=True)``. Here a name is only looked up in an allowlist (the ResEnc and
PlainConv backbones and the classification heads defined in ``pancreas_mtl.models``) and the other entries must be
plain values: numbers, strings, booleans, None and lists of them. Anything else is refused by name.
The same path builds the network at training time, so a config that trains also loads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pancreas_mtl.models.heads import ClassificationHead
from pancreas_mtl.models.plainconv_unet import PlainConvUNet
from pancreas_mtl.models.resenc_unet import ResEncUNet

TARGET_KEY = "_target_"
# Hydra keys that only say how to build; `_partial_` is how every model entry is written (the sizes are
# filled in from the plan), so it is accepted at the top of an entry and means nothing more here.
ACCEPTED_HYDRA_KEYS = {TARGET_KEY, "_partial_"}
PLAIN_SCALARS = (bool, int, float, str, type(None))


class UntrustedConfigError(ValueError):
    """A model config names a class outside the allowlist or holds something other than plain values."""


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def backbone_factories() -> dict[str, Callable]:
    """The backbones a config may name, by their ``_target_``."""
    return {_qualified_name(backbone) + ".from_plan": backbone.from_plan for backbone in (ResEncUNet, PlainConvUNet)}


def head_classes() -> dict[str, type[ClassificationHead]]:
    """The classification heads a config may name: every subclass of ClassificationHead defined inside
    this package (a new head is one class in ``models/heads.py``, and it is allowed from then on)."""
    found: dict[str, type[ClassificationHead]] = {}
    pending = list(ClassificationHead.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.split(".")[0] == "pancreas_mtl":
            found[_qualified_name(cls)] = cls
    return found


def check_plain(value: Any, where: str) -> None:
    """Raise UntrustedConfigError unless ``value`` is a plain value: a scalar, or a list/tuple/mapping of plain
    values whose keys are strings that are not Hydra directives (``_target_``, ``_args_``, ...)."""
    if isinstance(value, PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or (key.startswith("_") and key.endswith("_")):
                raise UntrustedConfigError(f"{where}.{key}: a nested Hydra directive or non-string key is not "
                                           "allowed in a model config (only plain values are)")
            check_plain(item, f"{where}.{key}")
        return
    raise UntrustedConfigError(f"{where}: expected a plain value (number, string, boolean, null or a list of "
                               f"them), found {type(value).__name__}")


def resolve_factory(entry: Mapping, allowed: Mapping[str, Callable], where: str) -> tuple[Callable, dict]:
    """(the allowed factory an entry names, its plain keyword arguments) for one model config entry."""
    target = entry.get(TARGET_KEY)
    if target not in allowed:
        raise UntrustedConfigError(f"{where}.{TARGET_KEY}: {target!r} is not one of this package's model classes "
                                   f"(allowed: {', '.join(sorted(allowed))})")
    kwargs = {}
    for key, value in entry.items():
        if key in ACCEPTED_HYDRA_KEYS:
            continue
        if not isinstance(key, str) or (key.startswith("_") and key.endswith("_")):
            raise UntrustedConfigError(f"{where}.{key}: Hydra directives other than _target_ and _partial_ are "
                                       "not allowed in a model config")
        check_plain(value, f"{where}.{key}")
        kwargs[key] = value
    factory = allowed[target]
    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise UntrustedConfigError(f"{where}: {target} takes no argument(s) {unknown} "
                                   f"(it takes {', '.join(parameters)})")
    return factory, kwargs


def build_part(entry: Mapping, allowed: Mapping[str, Callable], where: str, runtime: Mapping[str, Any]) -> Any:
    """Call the factory an entry names with its config values, plus those ``runtime`` values (sizes from
    the plan) that the factory takes and the entry does not set."""
    factory, kwargs = resolve_factory(entry, allowed, where)
    parameters = inspect.signature(factory).parameters
    filled = {key: value for key, value in runtime.items() if key in parameters and key not in kwargs}
    # the knobs have no defaults in Python (their values live in conf/model/): one the entry lacks is named
    missing = [name for name, p in parameters.items() if p.default is p.empty and name not in kwargs
               and name not in filled and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ValueError(f"{where}: {entry.get(TARGET_KEY)} needs {', '.join(missing)}, which the config does not "
                         "set (conf/model/ holds every value; a config saved before a key existed lacks it: add "
                         "it with the value that run was trained with)")
    return factory(**kwargs, **filled)
