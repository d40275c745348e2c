"""Every setting's value lives in YAML under conf/, nowhere in Python: the classes and functions the configs
build (each ``_target_`` of this package under conf/, and the LightningModule the ``module`` group feeds)
have no default for a key their config sets, the dataclass schemas typed from YAML hold no values
(every field MISSING), and no Python copy of the combined score's weights exists."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

from tests.conftest import REPO_ROOT

CONF = REPO_ROOT / "conf"
PACKAGE = REPO_ROOT / "pancreas_mtl"
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
# Targets of conf/ that still hold Python defaults (models/resenc_unet.py: the network and its parity tests). Strict:
# once their defaults are removed the test passes, xfail fails, and the entry must go.
PENDING = {
    "pancreas_mtl.models.resenc_unet.ResEncUNet.from_plan": "deep_supervision and the ResEncUNet knobs default "
                                                          "in models/resenc_unet.py",
}


# --- the configs' targets -----------------------------------------------------------------------------

def _composed(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A group file with the files of its own group that its defaults list names merged under it (as Hydra
    composes ``loss/ovr`` over ``loss/default``); other entries (other groups, overrides) are left out."""
    node = yaml.safe_load(path.read_text()) or {}
    if not isinstance(node, dict):
        return {}
    merged: dict = {}
    for entry in node.pop("defaults", None) or []:
        sibling = path.parent / f"{entry}.yaml" if isinstance(entry, str) and entry != "_self_" else None
        if sibling is not None and sibling.is_file() and sibling not in seen:
            merged = _merge(merged, _composed(sibling, (*seen, path)))
    return _merge(merged, node)


def _merge(base: dict, over: dict) -> dict:
    result = dict(base)
    for key, value in over.items():
        result[key] = _merge(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def _target_nodes(node, where: str) -> Iterator[tuple[str, str, set[str]]]:
    """(target, where, the keys the node sets) of every node with a ``_target_`` inside ``node``."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            yield target, where, {str(key) for key in node if key not in HYDRA_KEYS}
        for key, value in node.items():
            yield from _target_nodes(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _target_nodes(value, f"{where}[{index}]")


def package_targets() -> dict[str, dict[str, set[str]]]:
    """{target: {where: keys}} over every YAML file under conf/, for the targets in this package."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        for target, where, keys in _target_nodes(_composed(path), str(path.relative_to(REPO_ROOT))):
            if target.startswith("pancreas_mtl."):
                found.setdefault(target, {})[where] = keys
    return found


TARGETS = package_targets()


def locate(target: str):
    """The object a dotted ``_target_`` names (a module, then attributes)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(target)


def parameters_of(obj) -> dict[str, inspect.Parameter]:
    """The keyword parameters a config can set on ``obj``: its own, and for a classmethod that passes
    ``**kwargs`` on to its class (``ResEncUNet.from_plan``), the class's."""
    found = dict(inspect.signature(obj).parameters)
    owner = getattr(obj, "__self__", None)
    if inspect.isclass(owner) and any(p.kind is p.VAR_KEYWORD for p in found.values()):
        found = {**dict(inspect.signature(owner).parameters), **found}
    return {name: p for name, p in found.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def defaulted_config_keys(obj, nodes: dict[str, set[str]]) -> list[str]:
    """``where.key = default`` for every key a config node sets that ``obj`` gives a default of its own; a
    key ``obj`` does not take at all is reported too (the walk would miss its default)."""
    parameters = parameters_of(obj)
    problems = []
    for where, keys in sorted(nodes.items()):
        for key in sorted(keys):
            if key not in parameters:
                problems.append(f"{where}.{key}: not a parameter of {obj}")
            elif parameters[key].default is not inspect.Parameter.empty:
                problems.append(f"{where}.{key} = {parameters[key].default!r}")
    return problems


def test_the_walk_finds_the_targets_it_must():
    """The targets this rule is about are found (a walk that found nothing would pass everything)."""
    assert {"pancreas_mtl.losses.MultiTaskLoss", "pancreas_mtl.losses.SegmentationLoss",
            "pancreas_mtl.losses.ClassificationLoss", "pancreas_mtl.models.heads.MultiStageHead",
            "pancreas_mtl.models.heads.SingleStageHead", "pancreas_mtl.models.heads.OneVsRestHead",
            "pancreas_mtl.models.heads.LesionAttentionHead"} <= set(TARGETS)
    # a file that only overrides its sibling's keys is read with that sibling's target
    assert "conf/model/head/multistage_paper.yaml" in TARGETS["pancreas_mtl.models.heads.MultiStageHead"]
    assert {"region", "truth_guidance"} <= TARGETS["pancreas_mtl.models.heads.MultiStageHead"][
        "conf/model/head/multistage_paper.yaml"]
    assert set(PENDING) <= set(TARGETS), sorted(set(PENDING) - set(TARGETS))


@pytest.mark.parametrize("target", [
    pytest.param(target, marks=pytest.mark.xfail(strict=True, reason=PENDING[target])) if target in PENDING
    else target for target in sorted(TARGETS)])
def test_a_config_target_has_no_defaults_for_its_keys(target):
    assert defaulted_config_keys(locate(target), TARGETS[target]) == []


def test_the_module_has_no_defaults_for_the_module_group():
    from pancreas_mtl.training.module import MultiTaskModule

    module = yaml.safe_load((CONF / "module" / "default.yaml").read_text())
    module.pop("defaults")
    keys = {*module, "validation"}  # validation: the conf/inference preset its defaults list places there
    assert defaulted_config_keys(MultiTaskModule, {"conf/module/default.yaml": keys}) == []


def test_the_check_sees_a_default():
    """The checks above fail on a default for a config key (and on a key the target does not take)."""
    def head(decoder_channels, num_subtypes, *, pool, region="patch"):
        return None

    assert defaulted_config_keys(head, {"h.yaml": {"pool", "region", "hiden"}}) == [
        "h.yaml.hiden: not a parameter of " + str(head), "h.yaml.region = 'patch'"]


# --- the schemas typed from YAML ----------------------------------------------------------------------

def schemas() -> list[type]:
    from pancreas_mtl.commands.cli import COMMANDS
    from pancreas_mtl.dataset import settings as dataset_settings
    from pancreas_mtl.evaluation.evaluate import EvaluationConfig
    from pancreas_mtl.inference.settings import InferenceSettings
    from pancreas_mtl.raw.limits import InputLimits

    found = [InferenceSettings, InputLimits, EvaluationConfig, *(command.schema() for command in COMMANDS.values())]
    found += [value for value in vars(dataset_settings).values()
              if dataclasses.is_dataclass(value) and value.__module__ == dataset_settings.__name__]
    return list(dict.fromkeys(found))


# a key that only one of the files a schema types has: absent (None) in the others
OPTIONAL_NODES = {("DataSettings", "synthetic")}


@pytest.mark.parametrize("schema", schemas(), ids=lambda schema: schema.__name__)
def test_a_schema_holds_no_values(schema):
    valued = [f"{field.name} = {field.default!r}" for field in dataclasses.fields(schema)
              if (schema.__name__, field.name) not in OPTIONAL_NODES
              and (field.default is not MISSING or field.default_factory is not dataclasses.MISSING)]
    assert valued == []


def test_inference_settings_and_limits_read_their_yaml():
    from omegaconf import OmegaConf

    from pancreas_mtl.inference.settings import InferenceSettings
    from pancreas_mtl.raw.limits import InputLimits

    accurate = OmegaConf.load(CONF / "inference" / "accurate.yaml")
    fast = InferenceSettings.preset("fast")
    assert fast.name == "fast" and fast.mirror_axes == () and fast.sigma_scale == accurate.sigma_scale
    assert InferenceSettings.from_config({"overlap": 0.3}).max_windows_per_case == accurate.max_windows_per_case
    with pytest.raises(ValueError, match="unknown inference preset 'quick'"):
        InferenceSettings.preset("quick")
    with pytest.raises(TypeError, match="conf/inference/"):
        InferenceSettings(name="x")
    limits = OmegaConf.load(CONF / "limits" / "default.yaml")
    assert InputLimits.defaults().max_spacing_mm == limits.max_spacing_mm


# --- the combined score -------------------------------------------------------------------------------

def test_the_combined_weights_have_no_python_copy():
    """No dict literal in the package maps the combinable scores to weights: conf/module/default.yaml (and
    an experiment's override of it) is their only home."""
    import pancreas_mtl.training.module as module
    from pancreas_mtl.evaluation.combined import COMBINABLE

    assert not hasattr(module, "DEFAULT_COMBINED")
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and len(node.keys) >= 2 and all(
                    isinstance(key, ast.Constant) and key.value in COMBINABLE for key in node.keys) and all(
                    isinstance(value, ast.Constant) and isinstance(value.value, (int, float)) for value in node.values):
                copies.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert copies == []


def test_the_combined_rule():
    from pancreas_mtl.evaluation.combined import check_weights, combined_score, default_weights

    weights = {"whole_pancreas_dice": 1.0, "lesion_dice": 1.0, "macro_f1": 2.0}
    assert combined_score({"whole_pancreas_dice": 0.9, "lesion_dice": 0.5, "macro_f1": 0.2}, weights) == \
        pytest.approx((0.9 + 0.5 + 2 * 0.2) / 4)
    # undefined scores (no head: no F1; None in a study, NaN in training) are left out, not counted as 0
    assert combined_score({"whole_pancreas_dice": 0.9, "lesion_dice": 0.5, "macro_f1": None}, weights) == \
        pytest.approx(0.7)
    assert combined_score({"whole_pancreas_dice": 0.9, "lesion_dice": float("nan")}, weights) == pytest.approx(0.9)
    assert combined_score({}, weights) != combined_score({}, weights)  # NaN
    module_yaml = yaml.safe_load((CONF / "module" / "default.yaml").read_text())
    assert default_weights() == module_yaml["combined_metric"]
    with pytest.raises(ValueError, match="run 7: module.combined_metric names \\['auroc'\\]"):
        check_weights({"auroc": 1.0}, "run 7")
    with pytest.raises(ValueError, match="give at least one a weight > 0"):
        check_weights({"lesion_dice": 0}, "run 7")


def test_seg_only_weighs_the_two_dice_only():
    """experiment=seg_only's combined score is the mean of the two Dice even where macro F1 is defined (its
    mapping merges into the default's, so it must weigh macro_f1 0 rather than leave it out)."""
    from tests.conf_values import train_node
    from pancreas_mtl.evaluation.combined import check_weights, combined_score

    weights = check_weights(train_node("module.combined_metric", "experiment=seg_only"), "seg_only")
    assert combined_score({"whole_pancreas_dice": 0.8, "lesion_dice": 0.4, "macro_f1": 0.1}, weights) == \
        pytest.approx(0.6)
