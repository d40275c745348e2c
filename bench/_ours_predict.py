"""predict.py with each case's CPU seconds recorded; bench/predict_vs_nnunet.py runs it instead of predict.py.

    .venv/bin/python bench/_ours_predict.py --cpu-json PATH [predict.py overrides ...]

Runs the repository's predict.py unchanged (Hydra, the runner, the writer), with the runner's
per-case steps (``_load``: read + preprocess; ``_predict_one``: windows, export, write) wrapped to
add up ``time.process_time()`` per case. Only meaningful with ``prefetch=false``, where both run in
the main thread one after another. Writes ``{"cases": {case: cpu_s}, "process_cpu_s": ...}`` to PATH
at exit, also when predict.py exits with an error.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pancreas_mtl.inference import runner  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--cpu-json":
        raise SystemExit("usage: _ours_predict.py --cpu-json PATH [predict.py overrides ...]")
    cpu_json, overrides = Path(sys.argv[2]), sys.argv[3:]
    case_cpu: dict[str, float] = {}
    load, predict_one = runner._load, runner._predict_one

    def timed_load(predictor, case):
        start = time.process_time()
        try:
            return load(predictor, case)
        finally:
            case_cpu[case.case_id] = case_cpu.get(case.case_id, 0.0) + time.process_time() - start

    def timed_predict_one(predictor, loaded, *args, **kwargs):
        start = time.process_time()
        try:
            return predict_one(predictor, loaded, *args, **kwargs)
        finally:
            case_id = loaded.case.case_id
            case_cpu[case_id] = case_cpu.get(case_id, 0.0) + time.process_time() - start

    runner._load, runner._predict_one = timed_load, timed_predict_one
    sys.argv = [str(REPO_ROOT / "predict.py"), *overrides]
    try:
        runpy.run_path(str(REPO_ROOT / "predict.py"), run_name="__main__")
    finally:
        cpu_json.write_text(json.dumps({"cases": case_cpu, "process_cpu_s": time.process_time()}))


if __name__ == "__main__":
    main()
