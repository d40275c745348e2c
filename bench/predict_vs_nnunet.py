"""Our predictor against nnU-Net v2's own predictor on the same weights: seconds per case and mask agreement.

    .venv/bin/python bench/predict_vs_nnunet.py                # trained cpu_demo checkpoint (small preset)
    .venv/bin/python bench/predict_vs_nnunet.py --ckpt PATH --cases 3
    .venv/bin/python bench/predict_vs_nnunet.py --preset M     # ResEnc M, random weights, quiz plan, 1 case

The checkpoint (default: the newest ``outputs/runs/cpu_demo/*/checkpoints/last.ckpt``; with
``--preset M`` a randomly initialised ResEnc M with the multi-stage head at the quiz-like plan of
bench/param_count.py, saved as a checkpoint our predictor loads) is exported with
``export_nnunet_model_folder`` to an nnU-Net v2 model folder, so both tools run the same weights.
Inputs: the first ``--cases`` synthetic test images, and the real CT volumes of
``../shared/data/ct/`` (RAS, whole-abdomen field of view; not with ``--preset M``, whose windows
would take hours on a CPU), copied into ``{case}_0000.nii.gz`` folders.

Each run is its own process, one after another, with ``--threads`` torch threads (default 1):

- nnU-Net v2: bench/_nnunet_predict.py with ``.venv-nnunet``'s python (bench/nnunet_env.sh): the
  real ``nnUNetPredictor`` with its defaults (step 0.5, Gaussian, mirroring over all 8 axis
  combinations), ``predict_from_files_sequential`` one case at a time. Its default is also the
  equal-settings comparison for our ``accurate``, so one nnU-Net run serves every row.
- Ours: ``predict.py`` with ``inference=accurate|nnunet|fast|fastest``, fp32 on the CPU, ``prefetch=false``
  (one case after another in one process, as nnU-Net's sequential path), through
  bench/_ours_predict.py, which adds up each case's CPU seconds.

Seconds per case: "end to end" is the whole command (interpreter, imports, model loading) over the
cases; "per case" leaves start-up out (read, preprocess, windows, export, write of each case);
"network" is the sliding-window part. "(x)" is nnU-Net's seconds over ours (above 1: ours faster).
CPU seconds (user + system: ``process_time`` per case, ``getrusage`` for a command) are the figures
to compare on a shared machine: wall times follow the load other jobs put on the cores (a run under
``nice -n 19`` beside a training job can get a tenth of a core), CPU times much less.
Agreement: Dice per label (pancreas = labels 1 + 2, lesion = 2) between the masks of the two tools
on the input's grid, and of the other presets to our ``accurate``. ``nnunet`` is ``accurate`` with
``nnunet_compat`` (nnU-Net's image resampling, Gaussian and logit resampling: docs/inference.md), the
row that should reproduce nnU-Net's masks.

With ``--diagnose`` (default) the equal-settings pair is taken apart per case, from nnU-Net's own
preprocessed image and stitched logits (``_nnunet_predict.py --dump``): preprocessing (our
preprocessed image against nnU-Net's), windows (our sliding windows, ``accurate``, on nnU-Net's
preprocessed image against its logits, on the plan's grid) and export (nnU-Net's logits taken back
to the input grid by our export, which resamples probabilities, and with logits resampled instead,
as nnU-Net does, against nnU-Net's mask); the windows check is skipped for cases of more than
``--diagnose-max-passes`` window passes. Prints markdown tables with the machine, date, command and
load average; ``--json`` writes the raw figures. Run outputs go to outputs/bench/predict_vs_nnunet/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from _machine import cpu_model  # bench/ is on sys.path when a script runs
from param_count import quiz_like_fingerprint  # noqa: E402

from pancreas_mtl.raw.checks import load_case  # noqa: E402
from pancreas_mtl.evaluation.metrics import dice  # noqa: E402
from pancreas_mtl.inference.checkpoint import MODEL_PREFIX, load_network  # noqa: E402
from pancreas_mtl.inference.input_grid import restore_original_geometry  # noqa: E402
from pancreas_mtl.inference.predictor import InferenceSettings, Predictor  # noqa: E402
from pancreas_mtl.inference.sliding_window import predict_windows  # noqa: E402
from pancreas_mtl.inference.sources import find_cases  # noqa: E402
from pancreas_mtl.inference.windows import window_starts  # noqa: E402
from pancreas_mtl.models.multitask import build_model  # noqa: E402
from pancreas_mtl.models.nnunet_io import export_nnunet_model_folder  # noqa: E402
from pancreas_mtl.planning.planner import load_preset, plan_experiment  # noqa: E402
from pancreas_mtl.synthetic.dataset_folder import generate_dataset  # noqa: E402
from pancreas_mtl.synthetic.generator import load_config  # noqa: E402

CONF = REPO_ROOT / "conf"
CT_FOLDER = REPO_ROOT.parent / "shared" / "data" / "ct"
CT_CASES = ("example_ct", "example_ct_sm")
OUR_PRESETS = ("accurate", "nnunet", "fast", "fastest")
NNUNET_DIR = "nnunetv2"  # nnU-Net's own masks (our presets write to predictions/<input>/<preset>)
PANCREAS, LESION = "pancreas", "lesion"


def newest_demo_checkpoint() -> Path:
    found = sorted((REPO_ROOT / "outputs/runs/cpu_demo").glob("*/checkpoints/last.ckpt"),
                   key=lambda path: path.stat().st_mtime)
    if not found:
        raise SystemExit("no outputs/runs/cpu_demo/*/checkpoints/last.ckpt: run `python train.py "
                         "experiment=cpu_demo` (make demo), or pass --ckpt PATH or --preset M")
    return found[-1]


def random_m_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random ResEnc M (multi-stage head) at the quiz-like plan, saved as a checkpoint predict.py reads."""
    plan = plan_experiment(quiz_like_fingerprint(), load_preset("M"))
    model_cfg = {"backbone": OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/resenc.yaml")),
                 "head": OmegaConf.to_container(OmegaConf.load(CONF / "model/head/multistage.yaml"))}
    torch.manual_seed(seed)
    model = build_model(model_cfg, plan).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
                "pancreas_mtl": {"plan": plan.to_dict(), "config": {"model": model_cfg}}}, path)
    return path


def copy_inputs(folder: Path, images: dict[str, Path]) -> Path:
    """``folder`` holding copies of ``images`` as ``{case}_0000.nii.gz`` (the layout both tools read); copies,
    so that both read the same files even if the source set is regenerated meanwhile."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for case_id, image in images.items():
        shutil.copyfile(image, folder / f"{case_id}_0000.nii.gz")
    return folder


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], threads: int, log_path: Path) -> dict:
    """Wall and CPU (user + system) seconds, stdout and the 1-min load average before and after of a
    command run to the end; raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before, cpu_before = os.getloadavg()[0], children_cpu_seconds()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu = children_cpu_seconds() - cpu_before
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(command)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}\n"
                         f"(log: {log_path})")
    return {"wall": wall, "cpu": cpu, "stdout": done.stdout, "load": (load_before, os.getloadavg()[0])}


def run_nnunet(args, model: Path, inputs: Path, output: Path, dump: Path | None) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    command = [str(args.nnunet_python), str(REPO_ROOT / "bench/_nnunet_predict.py"), "--model", str(model),
               "--input", str(inputs), "--output", str(output), "--threads", str(args.threads)]
    if dump is not None:
        shutil.rmtree(dump, ignore_errors=True)
        command += ["--dump", str(dump)]
    run = run_timed(command, args.threads, output.parent / "logs" / f"{NNUNET_DIR}.log")
    line = next(line for line in run.pop("stdout").splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return {**run, "cases": {c["case_id"]: c for c in result.pop("cases")}, **result}


def run_ours(args, ckpt: Path, inputs: Path, output: Path, preset: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    cpu_json = output.parent / "logs" / f"{preset}_cpu.json"
    cpu_json.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO_ROOT / "bench/_ours_predict.py"), "--cpu-json", str(cpu_json),
               f"ckpt='{ckpt}'", f"input='{inputs}'", f"output='{output}'", f"inference={preset}",
               "device=cpu", "precision=fp32", f"inference.engine={args.engine}", f"num_threads={args.threads}",
               "prefetch=false",
               "progress=false", "overwrite=true", f"hydra.run.dir='{output.parent / 'logs' / preset}'"]
    run = run_timed(command, args.threads, output.parent / "logs" / f"{preset}.log")
    run.pop("stdout")
    case_cpu = json.loads(cpu_json.read_text())["cases"]
    with open(output / "timings.csv") as stream:
        cases = {row["case_id"]: {"total": float(row["total_s"]), "network": float(row["network_s"]),
                                  "windows": int(row["windows"]), "cpu": case_cpu[row["case_id"]]}
                 for row in csv.DictReader(stream)}
    return {**run, "cases": cases}


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.rint(np.asanyarray(image.dataobj)).astype(np.int16), image.affine


def label_dice(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {PANCREAS: dice(a > 0, b > 0), LESION: dice(a == 2, b == 2)}


def compare_masks(folder_a: Path, folder_b: Path, case_ids: list[str]) -> dict[str, dict]:
    """Per case: Dice per label between the two folders' masks (same voxel grid and affine required)."""
    scores = {}
    for case_id in case_ids:
        a, affine_a = read_mask(folder_a / f"{case_id}.nii.gz")
        b, affine_b = read_mask(folder_b / f"{case_id}.nii.gz")
        if a.shape != b.shape or not np.allclose(affine_a, affine_b, atol=1e-3):
            raise SystemExit(f"{case_id}: masks of {folder_a} and {folder_b} differ in grid: shapes "
                             f"{a.shape} vs {b.shape}, affines\n{affine_a}\n{affine_b}")
        scores[case_id] = {**label_dice(a, b), "foreground_b": int((b > 0).sum())}
    return scores


@torch.no_grad()
def diagnose(ckpt: Path, inputs: Path, dump: Path, nnunet_masks: Path, max_passes: int) -> dict[str, dict]:
    """Per case: where our accurate prediction and nnU-Net's part (see the module docstring)."""
    accurate = OmegaConf.to_container(OmegaConf.load(CONF / "inference/accurate.yaml"))
    settings = InferenceSettings.from_config({**accurate, "engine": "torch"})  # the windows in nnU-Net's arithmetic
    predictor = Predictor.from_checkpoints(ckpt, settings, device="cpu", precision="fp32")
    member, plan = predictor.members[0], predictor.plan
    cases, problems = find_cases(inputs)
    if problems:
        raise SystemExit(f"cases not found in {inputs}: {problems}")
    found = {}
    for case in cases:
        ours = predictor.preprocess(load_case(case))
        theirs = np.load(dump / f"{case.case_id}_data.npy")
        logits = torch.from_numpy(np.load(dump / f"{case.case_id}_logits.npy"))
        entry = {"shape_ours": list(ours.image.shape), "shape_nnunet": list(theirs.shape)}
        if ours.image.shape == theirs.shape:
            difference = np.abs(ours.image - theirs)
            entry.update(preprocess_mean_abs=float(difference.mean()),
                         preprocess_max_abs=float(difference.max()))
        window = predictor.window_for(member, theirs.shape[1:])
        passes = math.prod(len(window_starts(max(s, w), w, 1 - settings.overlap))
                           for s, w in zip(theirs.shape[1:], window)) * 2 ** len(settings.mirror_axes)
        entry["window_passes"] = passes
        if passes <= max_passes:
            windows = predict_windows(member.network, torch.from_numpy(theirs)[None], window, settings,
                                      lesion_channel=predictor.lesion_channel).logits[0]
            entry["windows_dice"] = label_dice(windows.argmax(0).numpy(), logits.argmax(0).numpy())
            logit_difference = (windows - logits).abs()
            entry.update(windows_mean_abs_logit=float(logit_difference.mean()),
                         windows_max_abs_logit=float(logit_difference.max()))
        mask, _ = read_mask(nnunet_masks / f"{case.case_id}.nii.gz")
        mask = mask.transpose(2, 1, 0)  # NIfTI (x, y, z) -> (z, y, x)
        for name, values in (("export_probabilities_dice", logits.softmax(0)),
                             ("export_logits_dice", logits)):
            labels, _ = restore_original_geometry(values, ours, plan.target_spacing)
            entry[name] = label_dice(labels, mask)
        found[case.case_id] = entry
    return found


def pair(scores: dict[str, float]) -> str:
    return f"{scores[PANCREAS]:.4f} / {scores[LESION]:.4f}"


def mean_min(scores: dict[str, dict], label: str) -> str:
    values = [s[label] for s in scores.values()]
    return f"{np.mean(values):.3f}" + (f" ({min(values):.3f})" if len(values) > 1 else "")


def per_case(run: dict, key: str) -> float:
    return float(np.mean([c[key] for c in run["cases"].values()]))


def ratio(ours: float, theirs: float) -> str:
    return f"{ours:.2f} / {theirs:.2f} ({theirs / ours:.2f})"


def speed_row(input_name: str, row: str, preset: str, ours: dict, nnunet: dict, vs_nnunet: dict,
              vs_accurate: dict | None) -> list[str]:
    n = len(ours["cases"])
    accurate = ("-" if vs_accurate is None
                else f"{mean_min(vs_accurate, PANCREAS)} / {mean_min(vs_accurate, LESION)}")
    return [input_name, row, preset, str(n),
            ratio(per_case(ours, "cpu"), per_case(nnunet, "cpu")), ratio(ours["cpu"] / n, nnunet["cpu"] / n),
            ratio(per_case(ours, "total"), per_case(nnunet, "total")),
            f"{per_case(ours, 'network'):.2f} / {per_case(nnunet, 'network'):.2f}",
            ratio(ours["wall"] / n, nnunet["wall"] / n),
            f"{mean_min(vs_nnunet, PANCREAS)} / {mean_min(vs_nnunet, LESION)}", accurate,
            f"{ours['load'][0]:.1f}-{ours['load'][1]:.1f} / {nnunet['load'][0]:.1f}-{nnunet['load'][1]:.1f}"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="default: the newest cpu_demo last.ckpt")
    parser.add_argument("--preset", choices=["M"], default=None,
                        help="M: a random ResEnc M at the quiz plan instead of a trained checkpoint")
    parser.add_argument("--cases", type=int, default=None, help="synthetic test cases (default 3; M: 1)")
    parser.add_argument("--inputs", nargs="+", choices=["synthetic", "ct"], default=None,
                        help="input sets (default both; M: synthetic)")
    parser.add_argument("--presets", nargs="+", choices=OUR_PRESETS, default=list(OUR_PRESETS))
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "outputs/data/synthetic_default",
                        help="synthetic dataset root; its test/ images are read, the default set generated "
                             "there only when it has none")
    parser.add_argument("--ct-folder", type=Path, default=CT_FOLDER,
                        help=f"folder of the real CT examples {', '.join(CT_CASES)} (.nii.gz)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--engine", default="torch",
                        help="our inference.engine: torch (the same arithmetic as nnU-Net, the default) | openvino "
                             "| onnxruntime | auto")
    parser.add_argument("--nnunet-python", type=Path, default=REPO_ROOT / ".venv-nnunet/bin/python")
    parser.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=True,
                        help="take the equal-settings pair apart (costs one more accurate pass)")
    parser.add_argument("--diagnose-max-passes", type=int, default=400,
                        help="diagnosis: cases with more accurate window passes skip the windows check")
    parser.add_argument("--out", type=Path, default=None,
                        help="default outputs/bench/predict_vs_nnunet/{checkpoint,M}")
    parser.add_argument("--json", type=Path, default=None, help="default <out>/results.json")
    args = parser.parse_args()
    if args.ckpt and args.preset:
        parser.error("--ckpt and --preset are alternatives")
    if not args.nnunet_python.exists():
        raise SystemExit(f"{args.nnunet_python} not found: run bench/nnunet_env.sh first")
    torch.set_num_threads(args.threads)
    out = (args.out or REPO_ROOT / "outputs/bench/predict_vs_nnunet" / (args.preset or "checkpoint"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if "accurate" not in args.presets:
        args.presets.insert(0, "accurate")  # the reference of the fast / fastest agreement

    if args.preset == "M":
        ckpt = random_m_checkpoint(out / "random_M_seed0.ckpt")
        network_name = "ResEnc M, random weights (seed 0), quiz plan"
    else:
        source = (args.ckpt or newest_demo_checkpoint()).resolve()
        shown = source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source
        network_name = f"checkpoint {shown}"
        # a copy: a training run may rewrite last.ckpt while the two tools read it one after another
        ckpt = out / "checkpoint.ckpt"
        shutil.copyfile(source, ckpt)
    network, plan, _ = load_network(ckpt)
    model_folder = export_nnunet_model_folder(network, plan, out / "nnunet_model")
    del network
    print(f"{network_name}: preset {plan.preset}, target spacing "
          f"{tuple(round(s, 3) for s in plan.target_spacing)}, patch {plan.patch_size}; nnU-Net model folder "
          f"{model_folder}", file=sys.stderr, flush=True)

    input_sets = args.inputs or (["synthetic"] if args.preset == "M" else ["synthetic", "ct"])
    cases = args.cases or (1 if args.preset == "M" else 3)
    sources = {}
    if "synthetic" in input_sets:
        if not any((args.data / "test").glob("*_0000.nii.gz")):
            # only when missing: an existing set (perhaps another job's training data) is read as it is
            generate_dataset(args.data, load_config("default"), progress=False)
        test_images = sorted((args.data / "test").glob("*_0000.nii.gz"))[:cases]
        sources["synthetic"] = {p.name[:-len("_0000.nii.gz")]: p for p in test_images}
    if "ct" in input_sets:
        sources["ct"] = {name: args.ct_folder / f"{name}.nii.gz" for name in CT_CASES}

    results, speed_rows, diagnosis_rows = {}, [], []
    for input_name, images in sources.items():
        inputs = copy_inputs(out / "inputs" / input_name, images)
        predictions = out / "predictions" / input_name
        dump = out / "nnunet_dump" / input_name if args.diagnose else None
        print(f"--- {input_name}: {len(images)} case(s), nnU-Net", file=sys.stderr, flush=True)
        nnunet = run_nnunet(args, model_folder, inputs, predictions / NNUNET_DIR, dump)
        ours = {}
        for preset in args.presets:
            print(f"--- {input_name}: ours, {preset}", file=sys.stderr, flush=True)
            ours[preset] = run_ours(args, ckpt, inputs, predictions / preset, preset)
        case_ids = sorted(images)
        vs_nnunet = {p: compare_masks(predictions / p, predictions / NNUNET_DIR, case_ids)
                     for p in args.presets}
        vs_accurate = {p: compare_masks(predictions / p, predictions / "accurate", case_ids)
                       for p in args.presets if p != "accurate"}
        for preset in args.presets:
            row = {"accurate": "(a) equal settings = (b)", "nnunet": "(a') equal settings, nnunet_compat"
                   }.get(preset, "(b)")
            speed_rows.append(speed_row(input_name, row, preset, ours[preset], nnunet, vs_nnunet[preset],
                                        vs_accurate.get(preset)))
        diagnosis = (diagnose(ckpt, inputs, dump, predictions / NNUNET_DIR, args.diagnose_max_passes)
                     if args.diagnose else {})
        for case_id, d in diagnosis.items():
            pre = f"shapes differ: {d['shape_ours']} vs {d['shape_nnunet']}"
            if "preprocess_mean_abs" in d:
                pre = f"{d['preprocess_mean_abs']:.4f} / {d['preprocess_max_abs']:.3f}"
            diagnosis_rows.append([input_name, case_id, pre,
                                   pair(d["windows_dice"]) if "windows_dice" in d
                                   else f"not run ({d['window_passes']} window passes)",
                                   f"{d['windows_mean_abs_logit']:.4f} / {d['windows_max_abs_logit']:.3f}"
                                   if "windows_dice" in d else "-",
                                   pair(d["export_probabilities_dice"]), pair(d["export_logits_dice"])])
        results[input_name] = {"nnunet": nnunet, "ours": ours, "dice_vs_nnunet": vs_nnunet,
                               "dice_vs_accurate": vs_accurate, "diagnosis": diagnosis}

    command = "python bench/predict_vs_nnunet.py " + " ".join(sys.argv[1:])
    first = next(iter(results.values()))["nnunet"]
    print(f"# {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch thread(s) per run, fp32; "
          f"{date.today()}; `{command.strip()}`; load average (1 min) {os.getloadavg()[0]:.1f} at the end")
    print(f"# network: {network_name} (patch {'x'.join(map(str, plan.patch_size))}); nnU-Net: nnunetv2 "
          f"{first['nnunetv2']}, torch {first['torch']}, nnUNetPredictor step 0.5, Gaussian, mirror axes "
          f"{first['mirror_axes']} (its default), predict_from_files_sequential; ours: predict.py fp32, "
          "prefetch=false")
    if args.preset == "M":
        print("# random weights: agreement tests that both tools compute the same thing, not segmentation "
              "quality")
    print()
    print_table(["input", "row", "ours", "cases", "CPU s per case: ours / nnU-Net (x)",
                 "CPU s/case end to end: ours / nnU-Net (x)", "wall s per case: ours / nnU-Net (x)",
                 "wall s network per case: ours / nnU-Net", "wall s/case end to end: ours / nnU-Net (x)",
                 "Dice to nnU-Net pancreas / lesion, mean (min)", "Dice to our accurate pancreas / lesion",
                 "load: ours / nnU-Net run"], speed_rows)
    if diagnosis_rows:
        print_table(["input", "case", "preprocessed image: mean / max abs difference (z-score units)",
                     "windows on nnU-Net's image: Dice pancreas / lesion to nnU-Net's argmax (plan grid)",
                     "windows: mean / max abs logit difference",
                     "nnU-Net's logits, our export (probabilities resampled): Dice to nnU-Net's mask",
                     "same, logits resampled (nnU-Net's order)"], diagnosis_rows)
    json_path = args.json or out / "results.json"
    json_path.write_text(json.dumps({"command": command, "date": str(date.today()), "machine": cpu_model(),
                                     "threads": args.threads, "network": network_name,
                                     "checkpoint": str(ckpt), "plan": plan.to_dict(), "results": results},
                                    indent=1, default=str))
    print(f"raw figures: {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
