"""The combined score: a weighted mean of a run's scores with the weights of its own ``module.combined_metric``.

One rule for every place that ranks runs: training's ``val/combined`` (and ``inner/combined``,
``select/combined``), and crossval, holdout, compare and tune, which read the weights from each run's
saved config (the checkpoint's, else its ``.hydra/config.yaml``). The weights' only home is the YAML
(conf/module/default.yaml; an experiment may change them, e.g. conf/experiment/seg_only.yaml weighs
the two Dice scores only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# the scores both training's validation and the evaluation compute, under the same names
COMBINABLE = ("whole_pancreas_dice", "lesion_dice", "macro_f1", "macro_auroc", "balanced_accuracy")
WEIGHTS_KEY = "module.combined_metric"


def check_weights(weights: Any, where: str) -> dict[str, float]:
    """``{metric: weight}`` as floats. ValueError naming ``where`` (the run or file the weights come
    from) for a metric outside :data:`COMBINABLE`, a weight that is not a number >= 0, or no weight > 0."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{where}: {WEIGHTS_KEY} must be a non-empty mapping {{metric: weight}}, found {weights!r}")
    unknown = sorted(str(name) for name in weights if name not in COMBINABLE)
    if unknown:
        raise ValueError(f"{where}: {WEIGHTS_KEY} names {unknown}, which are not scores; choose among "
                         f"{', '.join(COMBINABLE)}")
    checked = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{where}: {WEIGHTS_KEY}.{name} must be a number >= 0, found {weight!r}")
        checked[str(name)] = float(weight)
    if not any(checked.values()):
        raise ValueError(f"{where}: every weight of {WEIGHTS_KEY} is 0 ({checked}); give at least one a weight > 0")
    return checked


def combined_score(scores: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """The weighted mean of the weighted scores that are defined (present, not None, finite); NaN when none is.

    A score that is undefined for a run (macro F1 without a classification head) is left out and the other
    weights are renormalised, so a segmentation-only run is not ranked down for a score it cannot have."""
    total, weight_sum = 0.0, 0.0
    for name, weight in weights.items():
        value = scores.get(name)
        if value is not None and math.isfinite(float(value)) and weight:
            total += float(weight) * float(value)
            weight_sum += float(weight)
    return total / weight_sum if weight_sum else float("nan")


def default_weights() -> dict[str, float]:
    """conf/module/default.yaml's ``combined_metric``: the weights of a run config written before the key existed."""
    from omegaconf import OmegaConf

    from pancreas_mtl.config import config_dir

    path = config_dir() / "module" / "default.yaml"
    return check_weights(OmegaConf.to_container(OmegaConf.load(path).combined_metric), str(path))


def run_weights(configs: list[tuple[str, Mapping | None]]) -> dict[str, float]:
    """The combined score's weights of one run: ``module.combined_metric`` of the first of its configs
    that holds one, as ``(where, resolved config)`` pairs in the order to trust them (the checkpoint's,
    then the run folder's .hydra/config.yaml); conf/module/default.yaml's when none does (a run written
    before the weights were configurable scored with those)."""
    for where, config in configs:
        weights = ((config or {}).get("module") or {}).get("combined_metric")
        if weights is not None:
            return check_weights(dict(weights), where)
    return default_weights()
