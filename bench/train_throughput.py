"""Training steps per second of the ResEnc UNet at the quiz plan: our training step against nnU-Net v2's own.

    python bench/train_throughput.py                          # M preset (64 x 128 x 192, batch 2), CPU
    python bench/train_throughput.py --preset small           # the small preset's plan: a quick run
    python bench/train_throughput.py --device cuda --compile  # GPU variants, torch.compile included
    python bench/train_throughput.py --variants fp32 nnunet   # a subset (names below)

The plan comes from a quiz-like fingerprint (median spacing 2.0 x 0.7363 x 0.7363 mm, shape
60 x 119 x 184, (z, y, x); bench/param_count.py). Both sides train on the same batch: a random image
(B, 1, Z, Y, X) and an ellipsoid pancreas with a lesion as label. Each variant runs in its own
process, one after another (peak RSS is per process; never two big steps at once); warm-up steps are
left out of the mean.

- Ours (``.venv``): the network, loss, optimizer and lr schedule composed from ``conf/train.yaml`` as
  ``train.py`` builds them (ResEnc backbone with deep supervision, multi-stage subtype head,
  MultiTaskLoss, SGD Nesterov, poly lr), and one step as Lightning's automatic optimisation runs
  ``MultiTaskModule.training_step``: batch to the device, zero_grad, forward + loss under the
  precision's autocast, the non-finite check, backward (GradScaler for fp16), clip_grad_norm_ 12,
  optimizer and scheduler step. The deep-supervision labels are made inside the loss, so they are
  timed; Lightning's own loop (logging, hooks) is not.
- nnU-Net v2 (``.venv-nnunet``, made by bench/nnunet_env.sh): bench/_nnunet_step.py builds the real
  ``nnUNetTrainer`` from the plans.json of the same network and patch and times its own
  ``train_step``; its deep-supervision targets are made beforehand, as its data-loader workers do.

Variant names: ``fp32``, ``bf16``, ``fp16`` (autocast), each optionally with ``+tf32`` (CUDA),
``+cl`` (channels_last_3d) and ``+compile`` (torch.compile; needs ``--compile``); ``nnunet`` is
nnU-Net's trainer as it trains on the device (CPU: fp32, eager; CUDA: fp16 autocast + GradScaler,
eager here) and ``nnunet+compile`` its CUDA default with torch.compile (needs ``--compile``).
Prints one markdown table (machine, date, load average, s/step mean ± std, steps/s, peak memory);
``--json`` also writes the raw timings (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from _machine import cpu_model  # bench/ is on sys.path when a script runs
from param_count import quiz_like_fingerprint  # noqa: E402  (bench/ is on sys.path as the script's folder)

from pancreas_mtl.models import ResEncUNet  # noqa: E402
from pancreas_mtl.models.nnunet_plans import nnunet_dataset_json, nnunet_plans  # noqa: E402
from pancreas_mtl.planning.plan import Plan  # noqa: E402
from pancreas_mtl.planning.planner import load_preset, plan_experiment  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
QUIZ_SUBTYPE_COUNTS = [62, 106, 84]   # training cases per subtype (inverse-frequency class weights)
TOTAL_STEPS = 250_000                 # nnU-Net's 1000 epochs x 250 iterations, for the poly schedule
GIB = 1024**3


@dataclass(frozen=True)
class Variant:
    """One configuration to time; ``name`` is what ``--variants`` takes."""

    name: str
    implementation: str          # "ours" | "nnunet"
    precision: str = "fp32"      # fp32 | bf16 | fp16 (ours); nnU-Net's follows the device
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False

    def describe(self, device: str) -> str:
        if self.implementation == "nnunet":
            base = "fp32, eager (its CPU default)" if device == "cpu" else "fp16 autocast + GradScaler"
            if device == "cuda":
                base += ", torch.compile (its CUDA default)" if self.compile else ", eager (nnUNet_compile=f)"
            return f"nnU-Net trainer: {base}"
        precision = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}
        parts = [precision[self.precision]]
        if device == "cuda":
            parts.append("TF32 on" if self.tf32 or self.precision != "fp32" else "TF32 off")
        if self.channels_last:
            parts.append("channels_last_3d")
        if self.compile:
            parts.append("torch.compile")
        return "ours: " + ", ".join(parts)


def parse_variant(name: str, device: str, allow_compile: bool) -> Variant:
    """A variant from its name (``bf16+cl``, ``nnunet+compile``, ...), checked against the device."""
    head, *flags = name.split("+")
    unknown = set(flags) - {"tf32", "cl", "compile"}
    if unknown or len(set(flags)) != len(flags):
        raise ValueError(f"variant {name!r}: unknown or repeated flag(s) {sorted(unknown) or flags}; "
                         "flags are +tf32, +cl, +compile")
    if "compile" in flags and not allow_compile:
        raise ValueError(f"variant {name!r} compiles: pass --compile (inductor on CPU can take minutes)")
    if head == "nnunet":
        if set(flags) - {"compile"}:
            raise ValueError(f"variant {name!r}: nnU-Net's trainer takes only +compile")
        if "compile" in flags and device == "cpu":
            raise ValueError("nnU-Net's trainer never compiles on the CPU (nnUNetTrainer._do_i_compile)")
        return Variant(name, "nnunet", compile="compile" in flags)
    if head not in PRECISIONS:
        raise ValueError(f"variant {name!r}: expected nnunet or a precision {sorted(PRECISIONS)} first")
    if "tf32" in flags and (device != "cuda" or head != "fp32"):
        raise ValueError(f"variant {name!r}: TF32 applies to fp32 on CUDA only")
    return Variant(name, "ours", head, tf32="tf32" in flags, channels_last="cl" in flags,
                   compile="compile" in flags)


def default_variants(device: str, compile_too: bool) -> list[str]:
    """Ours next to nnU-Net first (closest in time, so under the most similar load), then the others."""
    if device == "cpu":
        return ["fp32", "nnunet", "bf16", "fp32+cl"] + (["fp32+compile"] if compile_too else [])
    names = ["fp32+tf32", "nnunet", "fp32", "bf16", "fp16", "bf16+cl"]
    return names + (["bf16+compile", "nnunet+compile"] if compile_too else [])


# --- the shared inputs --------------------------------------------------------------------------

def synthetic_batch(batch_size: int, patch_size, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """image (B, 1, Z, Y, X) float32 ~ N(0, 1) (z-scored CT) and label (B, 1, Z, Y, X) uint8: an
    ellipsoid pancreas (1) holding a lesion (2), shifted per sample."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch_size, 1, *patch_size), dtype=np.float32)
    label = np.zeros((batch_size, 1, *patch_size), dtype=np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in patch_size)]
    for b in range(batch_size):
        centre = np.asarray(patch_size) * rng.uniform(0.4, 0.6, 3)
        radii = np.asarray(patch_size) * np.array([0.25, 0.2, 0.3])
        pancreas = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1
        lesion = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii * 0.3)) < 1
        label[b, 0][pancreas] = 1
        label[b, 0][pancreas & lesion] = 2
    return image, label


def write_inputs(workdir: Path, plan: Plan, seed: int) -> None:
    """plan.json (ours), plans.json + dataset.json (nnU-Net's twin of the same network), the batch."""
    (workdir / "plan.json").write_text(json.dumps(plan.to_dict()))
    with torch.device("meta"):
        backbone = ResEncUNet.from_plan(plan)
    (workdir / "plans.json").write_text(json.dumps(nnunet_plans(backbone, plan)))
    (workdir / "dataset.json").write_text(json.dumps(nnunet_dataset_json(plan)))
    image, label = synthetic_batch(plan.batch_size, plan.patch_size, seed)
    np.save(workdir / "image.npy", image)
    np.save(workdir / "label.npy", label)


# --- our training step (worker process) ---------------------------------------------------------

def build_ours(plan: Plan, variant: Variant):
    """Module, optimizer and lr schedule as train.py composes them, with the variant's module knobs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pancreas_mtl.training.module import build_module

    overrides = ["num_subtypes=3", f"module.channels_last={variant.channels_last}",
                 f"module.compile={variant.compile}", f"module.tf32={variant.tf32}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    # only the groups build_module reads: paths.* interpolate Hydra's run-time config, unset here
    groups = ("num_subtypes", "model", "loss", "optimizer", "scheduler", "module")
    cfg = OmegaConf.create({key: cfg[key] for key in groups})
    module = build_module(cfg, plan, QUIZ_SUBTYPE_COUNTS)
    module.configure_model()      # channels_last and compile, as the Trainer calls it
    optimizer = module.optimizer_factory(params=[p for p in module.parameters() if p.requires_grad])
    scheduler = module.scheduler_factory(optimizer=optimizer, total_steps=TOTAL_STEPS)
    return module, optimizer, scheduler


def our_train_step(module, optimizer, scheduler, scaler, batch: dict, device: torch.device,
                   dtype: torch.dtype | None) -> float:
    """One optimisation step as Lightning's automatic optimisation runs MultiTaskModule.training_step
    with gradient_clip_val 12 (norm), for precision 32-true / bf16-mixed / 16-mixed."""
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        seg_logits, class_logits = module(batch["image"])
        terms = module.loss(seg_logits, class_logits, batch["label"], batch["subtype"])
    loss = terms["loss"]
    if not torch.isfinite(loss):  # training_step's check (one device sync, as in training)
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 12.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return float(loss.detach())


def run_ours(variant: Variant, workdir: Path, device_name: str, warmup: int, steps: int,
             threads: int, seed: int) -> dict:
    """Build and time our step in this process; returns the timings and peak memory."""
    from pancreas_mtl.devices import set_tf32

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        # what MultiTaskModule.setup does with module.tf32: the variant's choice in fp32, the
        # config default (on) under autocast, where only the fp32 leftovers use it
        set_tf32(variant.tf32 if variant.precision == "fp32" else True)
        torch.backends.cudnn.benchmark = True   # trainer=gpu
    plan = Plan.from_dict(json.loads((workdir / "plan.json").read_text()))
    torch.manual_seed(seed)   # initial weights and the head's dropout
    module, optimizer, scheduler = build_ours(plan, variant)
    module.to(device).train()
    scaler = torch.amp.GradScaler("cuda") if variant.precision == "fp16" and device.type == "cuda" else None
    batch = {"image": torch.from_numpy(np.load(workdir / "image.npy")),
             "label": torch.from_numpy(np.load(workdir / "label.npy")),
             "subtype": torch.arange(plan.batch_size, dtype=torch.int64) % plan.num_subtypes,
             "has_lesion": torch.ones(plan.batch_size, dtype=torch.bool)}
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
        torch.cuda.reset_peak_memory_stats()

    times, warmup_times, losses = [], [], []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(our_train_step(module, optimizer, scheduler, scaler, batch, device,
                                     PRECISIONS[variant.precision]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        (times if step >= warmup else warmup_times).append(elapsed)
        kind = "warm-up" if step < warmup else "timed"
        print(f"ours {variant.name} step {step} ({kind}): {elapsed:.3f} s, loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
    return {
        "times": times, "warmup_times": warmup_times, "losses": losses,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in module.model.parameters()),
    }


# --- the run (orchestrating process) ------------------------------------------------------------



def run_variant(variant: Variant, args, workdir: Path) -> dict:
    """One variant in a fresh process; the result dict, or one with ``error`` set."""
    common = ["--workdir", str(workdir), "--device", args.device, "--warmup", str(args.warmup),
              "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed)]
    if variant.implementation == "ours":
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant.name, *common]
    else:
        python = Path(args.nnunet_python)
        if not python.is_absolute():
            python = REPO / python
        if not python.exists():
            return {"error": f"not run: {python} missing (bench/nnunet_env.sh creates it)"}
        command = [str(python), str(BENCH / "_nnunet_step.py"), *common]
        command += ["--compile"] if variant.compile else []
    print(f"--- {variant.name}: {variant.describe(args.device)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    load_after = os.getloadavg()[0]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout[-4000:])
        return {"error": f"failed (exit {completed.returncode})", "load": (load_before, load_after)}
    return {**json.loads(lines[-1][len("RESULT "):]), "load": (load_before, load_after)}


def format_row(variant: Variant, result: dict, args, plan: Plan, reference: float | None) -> list[str]:
    machine = f"{cpu_model()}, {os.cpu_count()} cores" + (f", {result['gpu']}" if result.get("gpu") else "")
    setting = f"{args.preset}, {'x'.join(map(str, plan.patch_size))}, batch {plan.batch_size}"
    row = [machine, datetime.date.today().isoformat(), setting, variant.describe(args.device)]
    if "error" in result:
        row += ["-"] * 6 + ([] if args.device == "cpu" else ["-"])
        row[4] = result["error"]
    else:
        times = result["times"]
        mean = statistics.fmean(times)
        std = statistics.stdev(times) if len(times) > 1 else 0.0
        torch_version = result["torch"] + (f", nnunetv2 {result['nnunetv2']}" if "nnunetv2" in result else "")
        row += [f"{torch_version}, {result['threads']} threads",
                f"{mean:.3f} ± {std:.3f} (n={len(times)})", f"{1 / mean:.3g}",
                f"{reference / mean:.2f}" if reference else "-",
                ", ".join(f"{t:.1f}" for t in result["warmup_times"]) or "-",
                f"{result['peak_rss_bytes'] / GIB:.1f}"]
        if args.device == "cuda":
            row.append(f"{result['cuda_peak_bytes'] / GIB:.1f}")
    load = result.get("load")
    row.append(f"{load[0]:.2f} → {load[1]:.2f}" if load else "-")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="M", help="planning preset (conf/planning/): M, L, small")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", help="names to time (default: all for the device)")
    parser.add_argument("--compile", action="store_true", help="allow and add the torch.compile variants")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: CPU 1, CUDA 5)")
    parser.add_argument("--steps", type=int, help="timed steps (default: CPU 2, CUDA 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--nnunet-python", default=".venv-nnunet/bin/python",
                        help="python of nnU-Net's environment (bench/nnunet_env.sh)")
    parser.add_argument("--seed", type=int, default=0, help="batch and initial weights")
    parser.add_argument("--json", type=Path, help="also write the raw results here (e.g. bench/results/)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # internal: time one of our variants
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (20 if cuda else 2)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    if args.worker:
        variant = parse_variant(args.worker, args.device, allow_compile=True)
        result = run_ours(variant, args.workdir, args.device, args.warmup, args.steps, args.threads,
                          args.seed)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    names = args.variants or default_variants(args.device, args.compile)
    try:
        variants = [parse_variant(name, args.device, args.compile) for name in names]
    except ValueError as error:
        parser.error(str(error))
    plan = plan_experiment(quiz_like_fingerprint(), load_preset(args.preset))
    print(f"preset {args.preset}: patch {plan.patch_size} (z, y, x), batch {plan.batch_size}, "
          f"features {plan.features_per_stage}; {args.warmup} warm-up + {args.steps} timed steps per variant",
          file=sys.stderr)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, plan, args.seed)
        for variant in variants:
            results[variant.name] = run_variant(variant, args, workdir)

    nnunet = results.get("nnunet", {})
    reference = statistics.fmean(nnunet["times"]) if nnunet.get("times") else None
    header = ["machine", "date", "preset, patch, batch", "variant", "torch, threads", "s/step (mean ± std)",
              "steps/s", "x nnU-Net", "warm-up s", "peak RSS GiB"]
    header += ["GPU peak GiB"] if cuda else []
    header += ["load 1-min start → end"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for variant in variants:
        print("| " + " | ".join(format_row(variant, results[variant.name], args, plan, reference)) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": cpu_model(),
            "cores": os.cpu_count(), "device": args.device, "preset": args.preset, "plan": plan.to_dict(),
            "warmup": args.warmup, "steps": args.steps,
            "results": {v.name: {"description": v.describe(args.device), **results[v.name]}
                        for v in variants},
        }, indent=1, default=str))


if __name__ == "__main__":
    main()
