"""Prediction time per case on the CPU for the inference presets (fast, accurate, fastest).

    .venv/bin/python bench/inference_speed.py [--cases 3] [--presets fast accurate fastest] [--ckpt PATH]
                                              [--m-case | --no-m-case] [--threads N] [--precision fp32]

Generates the synthetic default set once (outputs/bench/synthetic_default_v<generator version>/),
plans the ``small`` preset on it and builds that network with random weights (or loads ``--ckpt``,
e.g. a ``train.py experiment=cpu_demo`` checkpoint, so the coarse pass of ``fastest`` finds a real
pancreas), and predicts ``--cases`` test cases per preset, as ``predict.py`` does (load, preprocess, windows, export, write), after one
warm-up forward pass (the first call of a shape sets up the CPU kernels). With ``--m-case`` it
also predicts one quiz-sized case (target spacing 2.0 x 0.73 x 0.73 mm, patch 64 x 128 x 192, as
REFERENCE section 1 plans it) with the ResEnc M network and the ``fast`` preset. Prints markdown rows
with the machine, date and command, for docs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from _machine import cpu_model  # bench/ is on sys.path when a script runs

from pancreas_mtl.raw.layout import discover  # noqa: E402
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor  # noqa: E402
from pancreas_mtl.inference.runner import predict_cases  # noqa: E402
from pancreas_mtl.inference.sliding_window import window_forward  # noqa: E402
from pancreas_mtl.inference.sources import find_cases  # noqa: E402
from pancreas_mtl.models.multitask import build_model  # noqa: E402
from pancreas_mtl.planning.fingerprint import load_or_compute_fingerprint  # noqa: E402
from pancreas_mtl.planning.planner import load_preset, plan_experiment  # noqa: E402
from pancreas_mtl.synthetic.dataset_folder import GENERATOR_VERSION, generate_dataset  # noqa: E402
from pancreas_mtl.synthetic.generator import load_config  # noqa: E402

CONF = REPO_ROOT / "conf"




def random_network(plan):
    model_cfg = {"backbone": OmegaConf.load(CONF / "model/backbone/resenc.yaml"),
                 "head": OmegaConf.load(CONF / "model/head/multistage.yaml")}
    torch.manual_seed(0)
    return build_model(model_cfg, plan).eval()


def preset(name: str) -> InferenceSettings:
    """A conf/inference preset composed as predict.py composes it (presets other than accurate list only
    what differs from it)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose("predict", [f"inference={name}"])
    return InferenceSettings.from_config(OmegaConf.to_container(composed.inference))


def with_engine(settings: InferenceSettings, engine: str) -> InferenceSettings:
    return InferenceSettings.from_config({**settings.to_config(), "engine": engine})


@torch.no_grad()
def warm_up(predictor: Predictor) -> None:
    """One forward pass of a patch-sized window: the first call of a shape sets up the CPU kernels."""
    for member in predictor.members:
        window_forward(member.network, torch.zeros(1, predictor.plan.num_input_channels, *member.patch_size))


def time_cases(predictor: Predictor, cases) -> tuple[float, float, float]:
    """(mean seconds per case, mean network seconds, mean window passes) over ``cases``, after a warm-up."""
    warm_up(predictor)
    out = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        summary = predict_cases(predictor, cases, out, progress=False, prefetch=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if summary.failed:
        raise RuntimeError(f"cases failed: {summary.failed}")
    timings = summary.timings
    return (float(np.mean([t["total"] for t in timings])), float(np.mean([t["network"] for t in timings])),
            float(np.mean([t["windows"] for t in timings])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="test cases timed per preset")
    parser.add_argument("--presets", nargs="*", default=["fast", "accurate", "fastest"])
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="a trained checkpoint instead of the random small network")
    parser.add_argument("--m-case", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one quiz-sized case with ResEnc M (fast preset)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 (CPU autocast)")
    parser.add_argument("--engine", default="torch",
                        help="inference.engine: torch (these figures' default) | openvino | onnxruntime | auto; "
                             "bench/engine_speed.py compares them")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = REPO_ROOT / "outputs" / "bench" / f"synthetic_default_v{GENERATOR_VERSION}"
    generate_dataset(root, load_config("default"), progress=False)
    index = discover(root)
    cases, _ = find_cases(root / "test")
    timed = cases[:args.cases]
    fingerprint = load_or_compute_fingerprint(index, root.parent / "fingerprint_synthetic_default.json",
                                              progress=False)
    if args.ckpt:
        network_name = f"checkpoint {args.ckpt.name}"
        make = lambda settings: Predictor.from_checkpoints(args.ckpt, settings, device="cpu",  # noqa: E731
                                                           precision=args.precision)
    else:
        plan = plan_experiment(fingerprint, load_preset("small"))
        network = random_network(plan)
        network_name = f"small, random weights, patch {'x'.join(map(str, plan.patch_size))}"
        make = lambda settings: Predictor([network], plan, settings, device="cpu", precision=args.precision)  # noqa: E731

    command = "python bench/inference_speed.py " + " ".join(sys.argv[1:])
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"# {machine}; {date.today()}; `{command.strip()}`")
    print("| network | preset | precision | cases | s/case | network s/case | window passes/case | machine | date |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.presets:
        seconds, network_seconds, windows = time_cases(make(with_engine(preset(name), args.engine)), timed)
        print(f"| {network_name} | {name} | {args.precision} | {len(timed)} | {seconds:.2f} | "
              f"{network_seconds:.2f} | {windows:.1f} | {machine} | {date.today()} |", flush=True)
    if args.m_case:
        plan = plan_experiment(fingerprint, load_preset("M"), {"target_spacing": [2.0, 0.73, 0.73],
                                                               "patch_size": [64, 128, 192]})
        predictor = Predictor([random_network(plan)], plan, with_engine(preset("fast"), args.engine), device="cpu",
                              precision=args.precision)
        seconds, network_seconds, windows = time_cases(predictor, timed[:1])
        print(f"| ResEnc M, random weights, patch 64x128x192 (quiz plan) | fast | {args.precision} | 1 | "
              f"{seconds:.2f} | {network_seconds:.2f} | {windows:.1f} | {machine} | {date.today()} |", flush=True)


if __name__ == "__main__":
    main()
