"""Preprocessing throughput (cases per second) on the synthetic dataset, cold cache, by worker count.

    .venv/bin/python bench/preprocessing_throughput.py [--size default] [--workers 0 1 2] [--preset M]

Generates the synthetic set once (outputs/bench/), then for each worker count fingerprints and
preprocesses every labelled case into a fresh cache and prints a markdown table row per run, for
docs/benchmarks.md. The fingerprint pass (reading and checking every case) is timed separately.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

from _machine import cpu_model  # bench/ is on sys.path when a script runs

from pancreas_mtl.raw.layout import discover
from pancreas_mtl.dataset.cache import build_cache
from pancreas_mtl.planning.fingerprint import compute_fingerprint
from pancreas_mtl.planning.planner import load_preset, plan_experiment
from pancreas_mtl.synthetic.dataset_folder import generate_dataset
from pancreas_mtl.synthetic.generator import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", help="synthetic preset (conf/synthetic/)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--preset", default="M", help="planning preset")
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    args = parser.parse_args()

    root = REPO_ROOT / "outputs" / "bench" / f"synthetic_{args.size}"
    generate_dataset(root, load_config(args.size), progress=False)
    index = discover(root)
    cases = index.labelled
    print(f"# {len(cases)} labelled cases from {root}; {cpu_model()}, {__import__('os').cpu_count()} cores, {date.today()}")
    print("| step | workers | cases | seconds | cases/s |")
    print("| --- | --- | --- | --- | --- |")
    for workers in args.workers:
        start = time.perf_counter()
        fingerprint = compute_fingerprint(index, num_workers=workers, progress=False)
        fingerprint_seconds = time.perf_counter() - start
        plan = plan_experiment(fingerprint, load_preset(args.preset), {"spacing_scale": args.spacing_scale})
        cache = Path(tempfile.mkdtemp(prefix="bench_cache_"))
        try:
            start = time.perf_counter()
            build_cache(index, plan, cache, cases=cases, num_workers=workers, progress=False)
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"| fingerprint + checks | {workers} | {len(cases)} | {fingerprint_seconds:.1f} | {len(cases) / fingerprint_seconds:.2f} |")
        print(f"| preprocess ({args.preset}, spacing x{args.spacing_scale:g}) | {workers} | {len(cases)} | {seconds:.1f} | {len(cases) / seconds:.2f} |")


if __name__ == "__main__":
    main()
