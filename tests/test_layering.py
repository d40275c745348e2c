"""Imports go one way, down the data flow: raw data -> planning -> the planned dataset -> models and
losses -> inference -> evaluation -> training. A module may import its own layer and the layers before
it, never one after it, so a newcomer can follow one case from NIfTI to Dice in order.

Training (the LightningModule and its logging) comes last on purpose: its validation runs the same
sliding-window inference and the same metrics as prediction and evaluation, and neither of those
imports Lightning (prediction starts without it)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pancreas_mtl"
# (layer, first dotted-name components below pancreas_mtl); entry points (cli, evaluate) may import anything
LAYERS = [
    ("helpers", {"files", "config", "devices", "run_info", "tracking", "tables", "output_guard"}),
    ("raw data", {"raw", "synthetic"}),
    ("planning", {"planning"}),
    ("planned dataset", {"dataset"}),
    ("models and losses", {"models", "losses", "optim"}),
    ("inference", {"inference"}),
    ("evaluation", {"evaluation", "wandb_runs"}),
    ("training", {"module", "logging_utils", "checkpointing", "training_plots", "monitoring", "wandb_media",
                  "validation_schedule", "refusals"}),
]
ENTRY_POINTS = {"cli", "evaluate", "__init__"}


def _layer(parts: list[str]) -> int | None:
    for rank, (_, names) in enumerate(LAYERS):
        if parts and parts[0] in names:
            return rank
    return None


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("pancreas_mtl.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.stem not in ENTRY_POINTS or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_data_flow(path):
    own = _layer(list(path.relative_to(PACKAGE).with_suffix("").parts))
    assert own is not None, f"{path} belongs to no layer; add it to LAYERS"
    upward = [name for name in _imports(path) if (_layer(name.split(".")[1:]) or 0) > own]
    assert not upward, f"{path.relative_to(REPO_ROOT)} ({LAYERS[own][0]}) imports later layers: {sorted(upward)}"
