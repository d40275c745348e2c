"""The package works installed from a wheel, away from the source tree: its configs ship inside it
(``pancreas_mtl.conf``), and ``pancreas-mtl train|predict|tune`` run the same commands as the checkout's
train.py, predict.py and tune.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.predict_helpers import save_checkpoint, tiny_plan, write_cases

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "pancreas_mtl").rglob("__init__.py")}
    assert listed == on_disk | {"pancreas_mtl.conf"}


def _run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_built_wheel_trains_and_predicts_outside_the_source_tree(tmp_path):
    # build the wheel from a copy, so that nothing (build/, *.egg-info) is written into the source tree
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("pancreas_mtl", "conf"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(source)], tmp_path, dict(os.environ))
    wheel = next((tmp_path / "dist").glob("pancreas_mtl-*.whl"))
    assert any(name.startswith("pancreas_mtl/conf/planning/") for name in zipfile.ZipFile(wheel).namelist())

    # a fresh environment: the wheel installed by pip (which writes the pancreas-mtl console script); the
    # dependencies (torch, ...) are reached through a path entry to this environment's site-packages, whose
    # editable-install hook is not run from there, so `import pancreas_mtl` can only find the wheel
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, dict(os.environ))
    python, command = venv / "bin" / "python", venv / "bin" / "pancreas-mtl"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, dict(os.environ))
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     dict(os.environ)).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert command.is_file()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PANCREAS_MTL_OUTPUTS=str(tmp_path / "outputs"), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    found = _run([str(python), "-c", "import pancreas_mtl.config as c; print(c.__file__); print(c.config_dir())"],
                 outside, env).stdout.split()
    assert all(Path(path).is_relative_to(site) for path in found), found

    _run([str(command), "train", "experiment=cpu_demo", "debug=fdr", "data.synthetic.size=tiny", "planning=small",
          "data.num_workers=0", "data.preprocessing_workers=0", "data.progress=false", "trainer.precision=32-true",
          "logger=csv"], outside, env)
    (run_dir,) = {path.parent for path in (tmp_path / "outputs" / "runs").rglob("plan.json")}
    assert (run_dir / "run_info.json").is_file() and list(run_dir.glob("*.log"))
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    assert list(outside.iterdir()) == []  # Hydra's run folder is under paths.output_root, not the cwd

    checkpoint = save_checkpoint(tmp_path / "c.ckpt", tiny_plan())
    names = write_cases(tmp_path / "cases", count=1)
    _run([str(command), "predict", f"ckpt={checkpoint}", f"input={tmp_path / 'cases'}",
          f"output={tmp_path / 'predictions'}", "progress=false"], outside, env)
    assert (tmp_path / "predictions" / f"{names[0]}.nii.gz").is_file()

    # a refused key is one error line and exit 2 or 1, as python predict.py gives it
    refused = subprocess.run([str(command), "predict", f"ckpt={tmp_path / 'missing.ckpt'}",
                              f"input={tmp_path / 'cases'}", f"output={tmp_path / 'elsewhere_pred'}"],
                             cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "missing.ckpt" in refused.stderr
    assert "Traceback" not in refused.stderr
    usage = _run([str(command), "--help"], outside, env).stdout
    assert all(f"  {name} " in usage for name in ("train", "predict", "tune", "evaluate"))
