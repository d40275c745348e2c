"""Warm start against training from scratch on small training sets (docs/benchmarks.md, "Warm start").

    .venv/bin/python bench/warm_start_study.py                 # the whole study, about 45 min on 2 cores
    .venv/bin/python bench/warm_start_study.py --seeds 1 --steps 120 --pretrain-steps 400   # a quick look

1. **Pretrain** segmentation only on the full training set of the synthetic ``default`` preset, generator
   seed 0 (150 cases): ``experiment=cpu_demo loss.cls_weight=0``.
2. **Fine-tune** on small training sets of generator seed 1 (24 and 60 cases, one shared validation set
   of 30 cases), multi-task (the cpu_demo recipe), at a fixed step budget, warm started from the
   pretrained ``last.ckpt`` with ``pretrained.parts=backbone`` (the head is new).
3. **From scratch** on the same cases with the same budget, same seeds.
4. **nnU-Net model folder**: the pretrained segmentation network written as an nnU-Net v2 model folder by
   nnU-Net's own classes (dynamic-network-architectures' ``ResidualEncoderUNet``, its plans.json layout
   and checkpoint dict), fine-tuned through ``pretrained=<folder> planning=from_pretrained``.

Every run is ``train.py`` in its own process (``hydra.run.dir`` under ``--out``), inner validation split
off (every case trains), validation every ``--val-every`` steps, no weight averaging (the curve is the
live weights'). Reported per arm, mean +- sd over the seeds: whole-pancreas Dice, lesion Dice and macro
F1 at the end, and the steps until the whole-pancreas Dice first reached 90% of its final value. A run
whose folder already holds its final checkpoint is read, not run again, so a killed study resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench._machine import cpu_model  # noqa: E402
from bench._study_runs import METRICS, curve, mean_sd, run_train  # noqa: E402


def generate(out: Path) -> tuple[Path, Path, Path]:
    """(pretraining set, 60-case set, 24-case set): seed 0's default preset, and seed 1 with 20 training
    cases per subtype; the 24-case set links 8 per subtype of those and the same validation cases."""
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    pretrain = generate_dataset(out / "data" / "pretrain_seed0", load_config("default"), progress=False)
    config = load_config("default")
    config.seed, config.train_counts, config.test_counts = 1, [20, 20, 20], [0, 0, 0]
    sixty = generate_dataset(out / "data" / "seed1_60", config, progress=False)
    small = out / "data" / "seed1_24"
    for image in sorted(sixty.glob("*/subtype*/*_0000.nii.gz")):
        split, subtype = image.parent.parent.name, image.parent.name
        rank = sorted(p for p in image.parent.glob("*_0000.nii.gz")).index(image)
        if split == "train" and rank >= 8:
            continue
        mask = image.with_name(image.name.replace("_0000.nii.gz", ".nii.gz"))
        for source in (image, mask):
            link = small / split / subtype / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source)
    return pretrain, sixty, small


def summarise(run_dir: Path) -> dict:
    rows = curve(run_dir)
    final = rows[-1]
    target = 0.9 * final[METRICS[0]]
    reached = next(row["step"] for row in rows if row[METRICS[0]] >= target)
    return {"final": {m: final[m] for m in METRICS}, "steps_to_90": reached, "curve": rows}


def write_nnunet_folder(checkpoint: Path, folder: Path) -> Path:
    """The pretrained segmentation network as an nnU-Net v2 model folder, written by nnU-Net's classes."""
    import pydoc

    import torch

    from pancreas_mtl.inference.checkpoint import load_network
    from pancreas_mtl.models.nnunet_plans import nnunet_dataset_json, nnunet_plans
    from pancreas_mtl.models.nnunet_weights import to_nnunet_state_dict

    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    network, plan, _ = load_network(checkpoint)
    plans = nnunet_plans(network.backbone, plan, dataset_name="Dataset900_SyntheticPancreas")
    dataset_json = nnunet_dataset_json(plan, num_training=150)
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    theirs = pydoc.locate(architecture["network_class_name"])(
        input_channels=plan.num_input_channels, num_classes=plan.num_classes, deep_supervision=True, **kwargs)
    theirs.load_state_dict(to_nnunet_state_dict(network.backbone))
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    torch.save({"network_weights": theirs.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "current_epoch": 1000, "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                                                     "dataset_json": dataset_json},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "warm_start")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=240, help="fine-tune / scratch budget (optimizer steps)")
    parser.add_argument("--val-every", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 60])
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "runs.log"
    started = time.time()
    pretrain_data, sixty, small = generate(out)
    roots = {24: small, 60: sixty}
    print("pretraining", flush=True)
    pretrain_dir = out / "runs" / "pretrain"
    run_train(pretrain_dir, args.pretrain_steps, min(100, args.pretrain_steps), [f"data.root={pretrain_data}", "loss.cls_weight=0.0"], log_file)
    source = pretrain_dir / "checkpoints" / "last.ckpt"
    nnunet = write_nnunet_folder(source, out / "nnUNet_results" / "Dataset900_SyntheticPancreas"
                                 / "nnUNetTrainer__nnUNetResEncUNetPlans__3d_fullres")
    arms = {"scratch": [], "warm start (our .ckpt)": [f"pretrained={source}", "pretrained.parts=backbone"],
            "warm start (nnU-Net model folder)": [f"pretrained={nnunet}", "planning=from_pretrained"]}
    results: dict = {"pretrain": summarise(pretrain_dir)}
    for size in args.sizes:
        for arm, extra in arms.items():
            if arm.endswith("(nnU-Net model folder)") and size != min(args.sizes):
                continue  # one row: the smallest set
            for seed in range(1, args.seeds + 1):
                name = f"{size}_{arm.split(' ')[0]}{'_nnunet' if 'nnU-Net' in arm else ''}_seed{seed}"
                run_dir = out / "runs" / name
                print(f"{name}", flush=True)
                run_train(run_dir, args.steps, args.val_every, [f"data.root={roots[size]}", f"seed={seed}", *extra],
                          log_file)
                results.setdefault(f"{size}|{arm}", []).append(summarise(run_dir))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{cpu_model()}, {date.today().isoformat()}, {time.time() - started:.0f} s; "
          f"pretrain {args.pretrain_steps} steps: final whole-pancreas Dice "
          f"{results['pretrain']['final'][METRICS[0]]:.3f}, lesion Dice {results['pretrain']['final'][METRICS[1]]:.3f}\n")
    print("| training cases | start | whole-pancreas Dice | lesion Dice | macro F1 | steps to 90% of final Dice |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, runs in results.items():
        if key == "pretrain":
            continue
        size, arm = key.split("|")
        cells = [mean_sd([run["final"][m] for run in runs]) for m in METRICS]
        steps = mean_sd([float(run["steps_to_90"]) for run in runs]).replace(".000", "")
        print(f"| {size} | {arm} | {' | '.join(cells)} | {steps} |")
    print("\nlesion Dice by step (mean over seeds):")
    for key, runs in results.items():
        if key == "pretrain":
            continue
        steps = [row["step"] for row in runs[0]["curve"]]
        means = [statistics.mean(run["curve"][i][METRICS[1]] for run in runs) for i in range(len(steps))]
        print(f"  {key}: " + ", ".join(f"{s}: {m:.3f}" for s, m in zip(steps, means)))


if __name__ == "__main__":
    main()
