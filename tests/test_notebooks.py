"""The notebooks (notebooks/*.ipynb): committed without outputs, in step with their jupytext .py pairs,
each with a papermill parameters cell, and each runs headless on tiny inputs: the tiny synthetic set,
training logs in Lightning's CSV format (a run and a multirun, two of them cross-validated), and an
evaluation of predictions with known mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import notebook_inputs
from tests.conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
jupytext = pytest.importorskip("jupytext", reason="the notebook tooling is in the dev extra")


def test_there_are_notebooks_and_each_has_its_pair():
    assert [p.stem for p in NOTEBOOKS] == ["01_data", "02_training", "03_errors"]
    for notebook in NOTEBOOKS:
        assert notebook.with_suffix(".py").is_file(), f"{notebook} has no jupytext pair {notebook.stem}.py"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(notebook):
    data = json.loads(notebook.read_text())
    for number, cell in enumerate(data["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{notebook.name} cell {number} holds outputs; strip them: nbstripout {notebook} "
                f"(or jupytext --to ipynb {notebook.with_suffix('.py')})")
    assert "papermill" not in data["metadata"] and "widgets" not in data["metadata"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_and_its_py_pair_are_in_sync(notebook):
    ipynb, percent = jupytext.read(notebook), jupytext.read(notebook.with_suffix(".py"))
    cells = [[(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells] for nb in (ipynb, percent)]
    assert cells[0] == cells[1], (f"{notebook.name} and {notebook.stem}.py differ; run jupytext --sync "
                                  f"{notebook.with_suffix('.py')} (the one edited last wins)")
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_first_among_code(notebook):
    code = [cell for cell in jupytext.read(notebook).cells if cell.cell_type == "code"]
    tagged = [i for i, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged == [0], f"{notebook.name}: the first code cell, alone, should be tagged parameters"


# --- executed headless ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("notebook_inputs")
    dataset = notebook_inputs.tiny_dataset(root / "data")
    predictions = notebook_inputs.predictions(dataset, root / "predictions")
    sweeps = [notebook_inputs.multirun(root / name) for name in ("multirun_a", "multirun_b")]
    for sweep, combined in zip(sweeps, (0.7, 0.8)):
        notebook_inputs.crossval_summary(sweep, dataset, combined)
    return {"root": root, "dataset": dataset, "run": notebook_inputs.training_run(root / "run", epochs=3),
            "sweeps": sweeps, "evaluation": notebook_inputs.evaluation(dataset, predictions, root / "evaluation")}


def _parameters(name: str, inputs: dict[str, Path], out: Path) -> dict:
    if name == "01_data":
        return {"data_root": str(inputs["dataset"]), "cases_per_subtype": 2, "planning_preset": "small"}
    if name == "02_training":
        return {"runs": [str(inputs["run"]), *map(str, inputs["sweeps"])],
                "compare_runs": [str(s) for s in inputs["sweeps"]], "compare_out": str(out / "compare")}
    return {"evaluation_dir": str(inputs["evaluation"]), "worst_count": 2}


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(notebook, inputs, tmp_path):
    papermill = pytest.importorskip("papermill")
    executed = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(executed), parameters=_parameters(notebook.stem, inputs, tmp_path),
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False, log_output=False)
    outputs = [output for cell in json.loads(executed.read_text())["cells"] for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(figures) >= {"01_data": 4, "02_training": 5, "03_errors": 7}[notebook.stem], len(figures)
    assert tables
    if notebook.stem == "02_training":
        ranking = json.loads((tmp_path / "compare" / "compare.json").read_text())["ranking"]
        assert [row["name"] for row in ranking] == [str(inputs["sweeps"][1]), str(inputs["sweeps"][0])]
    assert not list(NOTEBOOK_DIR.glob("*.png")) and not (tmp_path / "outputs").exists()
