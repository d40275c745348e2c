"""CPU inference engines against torch: seconds per window and per case, and agreement with torch fp32.

    .venv/bin/python bench/engine_speed.py                      # ResEnc M and small at the quiz plan, fast + accurate
    .venv/bin/python bench/engine_speed.py --quick              # small network, fast, one small case: under a minute
    .venv/bin/python bench/engine_speed.py --networks M --presets fast --threads 1 --json bench/results/engines.json

Networks: ResEnc M and the ``small`` preset planned for the quiz-like dataset of bench/param_count.py
(target spacing 2.0 x 0.74 x 0.74 mm; M's patch 64 x 128 x 192), random weights, multi-stage head.
The case is one synthetic quiz-sized CT (``--case-shape``, default 72 x 136 x 200 voxels at the quiz
spacing: a pancreas-like ellipsoid with a lesion in fat) written as NIfTI, so the end-to-end time is
``predict.py``'s (read, preprocess, windows, back to the input grid, write), process start-up excluded.

Variants (``--variants ENGINE:PRECISION ...``): ``torch:fp32`` (the reference), ``torch:bf16`` (CPU
autocast), ``openvino:fp32``, ``openvino:bf16`` (INFERENCE_PRECISION_HINT; needs AVX512_BF16 or AMX to
be fast), ``onnxruntime:fp32``; with ``--device cuda`` (bench/gpu_suite.sh) ``torch:fp32`` (TF32 on, as
predict.py), ``torch:bf16`` and ``torch:fp16`` autocast, and a peak GPU memory column
(``torch.cuda.max_memory_allocated`` over the case). Columns: seconds per window (``sw_batch_size`` windows per call, after
one warm-up call), seconds per case, each with "x torch" (torch fp32's seconds over the row's: above 1 the
row is faster), the share of mask voxels equal to torch fp32's mask, whether the subtype is the same, and
the set-up seconds (predictor built, ONNX export and engine compilation in a fresh cache, one warm-up call
and one warm-up case, which compiles the window batches a case needs; the timed case is a second one, as
every case after the first of a run, or of any run once the disk cache holds the exports).
The 2 shared cores of the project machine make every figure noisy: run alone and note the load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from _machine import cpu_model  # bench/ is on sys.path when a script runs
from param_count import quiz_like_fingerprint  # noqa: E402

from pancreas_mtl.raw.io import write_nifti  # noqa: E402
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor  # noqa: E402
from pancreas_mtl.inference.runner import predict_cases  # noqa: E402
from pancreas_mtl.inference.sliding_window import autocast_context, window_forward  # noqa: E402
from pancreas_mtl.inference.sources import find_cases  # noqa: E402
from pancreas_mtl.models.multitask import build_model  # noqa: E402
from pancreas_mtl.planning.planner import load_preset, plan_experiment  # noqa: E402

CONF = REPO_ROOT / "conf"
QUIZ_SPACING = (2.0, 0.7363, 0.7363)
VARIANTS = {"cpu": ("torch:fp32", "torch:bf16", "openvino:fp32", "openvino:bf16", "onnxruntime:fp32"),
            "cuda": ("torch:fp32", "torch:bf16", "torch:fp16")}
GIB = 1024**3


def random_network(preset: str):
    plan = plan_experiment(quiz_like_fingerprint(), load_preset(preset))
    model_cfg = {"backbone": OmegaConf.load(CONF / "model/backbone/resenc.yaml"),
                 "head": OmegaConf.load(CONF / "model/head/multistage.yaml")}
    torch.manual_seed(0)
    return build_model(model_cfg, plan).eval(), plan


def preset_settings(name: str) -> InferenceSettings:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose("predict", [f"inference={name}"])
    return InferenceSettings.from_config(OmegaConf.to_container(composed.inference))


def write_case(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """One CT-like case (Z, Y, X) at the quiz spacing: fat, a pancreas-like ellipsoid, a lesion inside it."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    pancreas = (grid[0] / 0.6) ** 2 + (grid[1] / 0.3) ** 2 + (grid[2] / 0.7) ** 2 < 1
    lesion = ((grid[0] / 0.25) ** 2 + ((grid[1] - 0.05) / 0.15) ** 2 + ((grid[2] - 0.2) / 0.2) ** 2 < 1) & pancreas
    hu = rng.normal(-100, 20, shape)
    hu[pancreas] = rng.normal(100, 15, int(pancreas.sum()))
    hu[lesion] = rng.normal(40, 15, int(lesion.sum()))
    affine = np.diag([-QUIZ_SPACING[2], -QUIZ_SPACING[1], QUIZ_SPACING[0], 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(hu.astype(np.int16), affine, folder / "quiz_case_0000.nii.gz")
    return folder


def seconds_per_window(predictor: Predictor, repeats: int) -> float:
    """Mean seconds per window of ``repeats`` calls of ``sw_batch_size`` patch-sized windows, after a warm-up."""
    member = predictor.members[0]
    windows = torch.randn(predictor.settings.sw_batch_size, predictor.plan.num_input_channels, *member.patch_size)
    windows = windows.to(predictor.device)
    with torch.no_grad(), autocast_context(predictor.device, predictor.autocast_dtype):
        predictor.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            window_forward(member.network, windows)
        predictor.synchronize()
        return (time.perf_counter() - start) / (repeats * windows.shape[0])


def predict_case(predictor: Predictor, cases, out: Path) -> tuple[float, np.ndarray, int]:
    """(seconds for the case end to end, its mask, its subtype)."""
    summary = predict_cases(predictor, cases, out, progress=False, prefetch=False, overwrite=True)
    if summary.failed:
        raise RuntimeError(f"prediction failed: {summary.failed}")
    record = json.loads((out / ".records" / f"{cases[0].case_id}.json").read_text())
    mask = np.asanyarray(nib.load(str(out / f"{cases[0].case_id}.nii.gz")).dataobj)
    return summary.timings[0]["total"], mask, record["subtype"]


def run(args) -> list[dict]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="engine_speed_"))
    try:
        cases, _ = find_cases(write_case(work / "input", tuple(args.case_shape)))
        for network_name in args.networks:
            network, plan = random_network(network_name)
            for preset in args.presets:
                settings = preset_settings(preset)
                reference = None
                for variant in args.variants:
                    engine, precision = variant.split(":")
                    cache = work / "cache" / f"{network_name}_{variant.replace(':', '_')}"
                    start = time.perf_counter()
                    try:
                        predictor = Predictor([network], plan, replace(settings, engine=engine), device=args.device,
                                              precision=precision, engine_cache=cache, num_threads=args.threads)
                        seconds_per_window(predictor, 1)  # warm-up: export, compile, kernel set-up
                        predict_case(predictor, cases, work / "warm-up" / variant)  # and the case's own shapes
                    except (ImportError, ValueError) as error:
                        print(f"# {network_name} {preset} {variant} skipped: {error}", flush=True)
                        continue
                    setup = time.perf_counter() - start
                    window = seconds_per_window(predictor, args.repeats)
                    if args.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    case_seconds, mask, subtype = predict_case(predictor, cases, work / "out" / variant)
                    peak = torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else None
                    row = {"network": network_name, "patch": "x".join(map(str, plan.patch_size)), "preset": preset,
                           "engine": engine, "precision": precision, "s_per_window": window,
                           "s_per_case": case_seconds, "setup_s": setup, "subtype": subtype, "peak_gib": peak}
                    if reference is None and variant == "torch:fp32":
                        reference = (window, case_seconds, mask, subtype)
                    if reference is not None:
                        row.update(x_torch_window=reference[0] / window, x_torch_case=reference[1] / case_seconds,
                                   mask_agreement=float((mask == reference[2]).mean()),
                                   same_subtype=subtype == reference[3])
                    rows.append(row)
                    print_row(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def print_row(row: dict) -> None:
    def figure(key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "n/a"
    print(f"| {row['network']} ({row['patch']}) | {row['preset']} | {row['engine']} | {row['precision']} | "
          f"{row['s_per_window']:.2f} | {figure('x_torch_window', '.1f')} | {row['s_per_case']:.2f} | "
          f"{figure('x_torch_case', '.1f')} | {figure('mask_agreement', '.5f')} | "
          f"{row.get('same_subtype', 'n/a')} | {row['setup_s']:.1f} |"
          + ("" if row["peak_gib"] is None else f" {row['peak_gib']:.2f} |"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["M", "small"], help="planning presets: M, small, L")
    parser.add_argument("--presets", nargs="+", default=["fast", "accurate"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="ENGINE:PRECISION ... (default: every one for the device)")
    parser.add_argument("--case-shape", nargs=3, type=int, default=[72, 136, 200], help="(z, y, x) voxels")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per window figure")
    parser.add_argument("--threads", type=int, default=None, help="torch and engine threads (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small network, fast preset, a 36 x 60 x 100 case (one window), one repeat, "
                             "no torch:bf16: under a minute")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    quick_variants = [v for v in VARIANTS[args.device] if v != "torch:bf16"] if args.quick else None
    args.variants = args.variants or quick_variants or list(VARIANTS[args.device])
    if args.quick:
        args.networks, args.presets, args.case_shape, args.repeats = ["small"], ["fast"], [36, 60, 100], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/engine_speed.py " + " ".join(sys.argv[1:])
    print(f"# {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}; {date.today()}; `{command.strip()}`")
    gpu = args.device == "cuda"
    if gpu:
        print(f"# GPU: {torch.cuda.get_device_name()}")
    print("| network (patch) | preset | engine | precision | s/window | x torch | s/case | x torch | "
          "mask agreement | same subtype | set-up s |" + (" peak GiB |" if gpu else ""))
    print("| --- " * (12 if gpu else 11) + "|", flush=True)
    rows = run(args)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
