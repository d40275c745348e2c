"""The values conf/ gives the classes the configs build, for tests that construct one directly: the classes
have no defaults of their own (tests/test_defaults.py), so a test passes the YAML's values, changing only
what it is about."""

from __future__ import annotations

import functools
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT

HYDRA_KEYS = ("_target_", "_partial_")


@functools.lru_cache(maxsize=32)
def _composed(overrides: tuple[str, ...]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return {group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("model", "loss", "module")}


def train_node(dotted: str, *overrides: str, **changes: Any) -> dict:
    """The keyword arguments the node at ``dotted`` (``loss.seg_loss``, ``model.head``) of conf/train.yaml
    composed with ``overrides`` (``model/head=ovr``) builds its target with, ``changes`` over them."""
    node: Any = _composed(tuple(overrides))
    for key in dotted.split("."):
        node = node[key]
    return {**{key: value for key, value in node.items() if key not in HYDRA_KEYS}, **changes}


def head_values(name: str, **changes: Any) -> dict:
    """conf/model/head/<name>.yaml's knobs (its defaults list followed), ``changes`` over them."""
    return train_node("model.head", f"model/head={name}", **changes)


def segmentation_loss_values(**changes: Any) -> dict:
    """conf/loss/default.yaml's ``seg_loss`` (nnU-Net's Dice + CE), ``changes`` over it."""
    return train_node("loss.seg_loss", **changes)


def classification_loss_values(**changes: Any) -> dict:
    """conf/loss/default.yaml's ``cls_loss``, ``changes`` over it; its inverse-frequency class weights need the
    training split's counts, so a test without them passes ``class_weights=None`` (or counts)."""
    return train_node("loss.cls_loss", **changes)
