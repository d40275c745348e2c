"""Memory of ``predict.py`` over a folder of many cases: peak RSS, and RSS growth per case.

    .venv/bin/python bench/prediction_memory.py [--counts 20 200] [--threads 1] [--preset fast]

Generates the tiny synthetic preset with 200 test cases once (outputs/bench/memory_tiny_v<generator
version>/; about a minute), plans the ``small`` preset at twice its spacing on its 6 training cases
(the cpu_demo network) and saves that network with random weights as a training checkpoint. Then, for
each count, a fresh ``predict.py`` process predicts the first N test cases (a folder of links to
them) into an empty folder, while this script samples the child's resident memory (``VmRSS`` in
/proc) every 50 ms together with the number of finished cases (their ``.records``). The child's peak
RSS comes from ``wait4`` (``ru_maxrss``). Per count it reports the peak, the RSS after the first 10%
of the cases and at the last sample, and the least-squares slope of RSS against finished cases over
the second half of the run (KiB per case): a leak shows as a slope that stays positive and a peak
that grows with the count. Prints a markdown table with the machine, date, load and command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
OUTPUTS = Path(os.environ.get("PANCREAS_MTL_OUTPUTS", REPO_ROOT / "outputs"))
TEST_CASES = 200
TRAIN_COUNTS = (2, 2, 2)

from _machine import cpu_model  # noqa: E402  (bench/ is on sys.path when a script runs)


def make_dataset(root: Path) -> Path:
    """The tiny preset with 200 test cases (67/67/66 per subtype) and 6 training cases, no validation."""
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    config = load_config("tiny")
    config.name = "memory_tiny"
    config.train_counts, config.validation_counts = TRAIN_COUNTS, (0, 0, 0)
    config.test_counts = (67, 67, TEST_CASES - 134)
    return generate_dataset(root, config, progress=True)


def make_checkpoint(dataset: Path, path: Path) -> Path:
    """The cpu_demo network (small preset at 2x spacing, multi-stage head) with random weights, saved the
    way training saves it (weights under ``model.``, the plan and the model config)."""
    import torch
    from omegaconf import OmegaConf

    from pancreas_mtl.raw.layout import discover
    from pancreas_mtl.models.multitask import build_model
    from pancreas_mtl.planning.fingerprint import compute_fingerprint
    from pancreas_mtl.planning.planner import load_preset, plan_experiment

    preset = load_preset("small")
    preset["spacing_scale"] = 2.0
    preset.pop("overrides", None)
    plan = plan_experiment(compute_fingerprint(discover(dataset), progress=False), preset, {})
    model_cfg = {group: OmegaConf.to_container(OmegaConf.load(REPO_ROOT / f"conf/model/{group}/{name}.yaml"))
                 for group, name in (("backbone", "resenc"), ("head", "multistage"))}
    torch.manual_seed(0)
    network = build_model(model_cfg, plan)
    torch.save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
                "pancreas_mtl": {"plan": plan.to_dict(), "config": {"model": model_cfg}}}, path)
    return path


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def measure(count: int, dataset: Path, checkpoint: Path, work: Path, threads: int, preset: str) -> dict:
    """Run predict.py over the first ``count`` test cases in a fresh process; its memory over time."""
    images = sorted((dataset / "test").glob("*_0000.nii.gz"))[:count]
    folder, out = work / f"in_{count}", work / f"out_{count}"
    for path in (folder, out):
        shutil.rmtree(path, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in images:
        (folder / image.name).symlink_to(image)
    command = [sys.executable, str(REPO_ROOT / "predict.py"), f"ckpt={checkpoint}", f"input={folder}",
               f"output={out}", f"inference={preset}", "device=cpu", "progress=false",
               f"num_threads={threads}", f"hydra.run.dir={work / f'hydra_{count}'}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=work)
    samples: list[tuple[int, int]] = []  # (finished cases, RSS KiB)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = rss_kib(process.pid)
            if rss is not None:
                samples.append((len(list((out / ".records").glob("*.json"))), rss))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for ru_maxrss
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"predict.py failed on {count} cases:\n{stderr.decode()[-3000:]}")
    finished = len(list((out / ".records").glob("*.json")))
    cases = np.array([c for c, _ in samples], dtype=float)
    rss = np.array([r for _, r in samples], dtype=float)
    second_half = cases >= count / 2
    slope = 0.0
    if np.ptp(cases[second_half]) > 0:
        slope = float(np.polyfit(cases[second_half], rss[second_half], 1)[0])
    early = rss[cases >= max(1, count // 10)]
    return {"cases": count, "finished": finished, "seconds": seconds, "peak_mib": usage.ru_maxrss / 1024,
            "early_mib": float(early[0]) / 1024 if early.size else float("nan"),
            "last_mib": float(rss[-1]) / 1024 if rss.size else float("nan"), "slope_kib_per_case": slope}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="fast", help="conf/inference preset")
    args = parser.parse_args(argv)
    if max(args.counts) > TEST_CASES:
        parser.error(f"at most {TEST_CASES} cases")
    from pancreas_mtl.synthetic.dataset_folder import GENERATOR_VERSION

    dataset = make_dataset(OUTPUTS / "bench" / f"memory_tiny_v{GENERATOR_VERSION}")
    work = OUTPUTS / "bench" / "prediction_memory"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(dataset, work / "random_small.ckpt")
    load = os.getloadavg()
    rows = [measure(count, dataset, checkpoint, work, args.threads, args.preset) for count in args.counts]
    load_after = os.getloadavg()
    command = " ".join(["bench/prediction_memory.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"`{command}`, {cpu_model()}, "
          f"{os.cpu_count()} cores, {args.threads} torch thread(s), preset {args.preset}, {date.today()}; "
          f"load average {load[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| cases | finished | wall s | peak RSS MiB | RSS after 10% MiB | RSS at end MiB "
          "| RSS slope, 2nd half (KiB/case) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['cases']} | {row['finished']} | {row['seconds']:.0f} | {row['peak_mib']:.0f} | "
              f"{row['early_mib']:.0f} | {row['last_mib']:.0f} | {row['slope_kib_per_case']:.1f} |")


if __name__ == "__main__":
    main()
