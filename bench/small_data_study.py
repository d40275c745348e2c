"""The demo recipe on a small training set: augmentation and lesion-centred sampling against nnU-Net's
defaults, and whether the lesion Dice falls late in training (docs/benchmarks.md, "Small training sets").

    .venv/bin/python bench/small_data_study.py                    # the whole study, about 1 h on 2 cores
    .venv/bin/python bench/small_data_study.py --steps 400 --val-every 100 --arms demo nnunet_augmentation

On 59 real pancreas CTs the demo recipe's lesion Dice peaked around step 1000-1250 and then fell while the
training loss kept falling (issue 26); the recipe had been chosen on the 150-case synthetic set. This
study repeats that setting on synthetic data: the ``default`` generator preset with 50 training cases
(17/17/16 per subtype, the size of a small real study) and its 30 validation cases, generator seed
``--data-seed``. Every arm is the cpu_demo recipe (multi-task, AdamW + cosine, small preset) with every
training case trained on, validated every ``--val-every`` steps on the live weights (no average), and
changes one or both of:

- ``augmentation=nnunet`` against the demo's ``augmentation=light``;
- ``data.sampling.lesion_centred_probability=0.0`` (nnU-Net's foreground sampling: a random foreground
  voxel of a random class) against the demo's 0.5.

Reported per arm: whole-pancreas Dice, lesion Dice and macro F1 at the last step; the best lesion Dice,
its step, and the drop from it to the last step; the lesion Dice at every validation.
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

ARMS = {
    "demo": ("augmentation=light, lesion-centred 0.5 (the demo)", []),
    "nnunet_augmentation": ("augmentation=nnunet, lesion-centred 0.5", ["augmentation=nnunet"]),
    "nnunet_sampling": ("augmentation=light, lesion-centred 0 (nnU-Net's sampling)",
                        ["data.sampling.lesion_centred_probability=0.0"]),
    "nnunet_both": ("augmentation=nnunet, lesion-centred 0 (nnU-Net's both)",
                    ["augmentation=nnunet", "data.sampling.lesion_centred_probability=0.0"]),
}


def generate(out: Path, seed: int, train_counts: list[int]) -> Path:
    from pancreas_mtl.synthetic.dataset_folder import generate_dataset
    from pancreas_mtl.synthetic.generator import load_config

    config = load_config("default")
    config.seed, config.train_counts, config.test_counts = seed, train_counts, [0, 0, 0]
    return generate_dataset(out / "data" / f"seed{seed}_{sum(train_counts)}", config, progress=False)


def summarise(run_dir: Path) -> dict:
    rows = curve(run_dir)
    lesion = METRICS[1]
    best = max(rows, key=lambda row: row[lesion])
    return {"final": {m: rows[-1][m] for m in METRICS}, "best_lesion": best[lesion], "best_lesion_step": best["step"],
            "lesion_drop": best[lesion] - rows[-1][lesion], "curve": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "small_data")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 1..N per arm")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--data-seed", type=int, default=2)
    parser.add_argument("--train-counts", type=int, nargs=3, default=[17, 17, 16], help="training cases per subtype")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    root = generate(out, args.data_seed, args.train_counts)
    results: dict = {}
    for arm in args.arms:
        for seed in range(1, args.seeds + 1):
            run_dir = out / "runs" / f"{arm}_seed{seed}"
            print(run_dir.name, flush=True)
            run_train(run_dir, args.steps, args.val_every, [f"data.root={root}", f"seed={seed}", *ARMS[arm][1]],
                      out / "runs.log")
            results.setdefault(arm, []).append(summarise(run_dir))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{cpu_model()}, {date.today().isoformat()}, {time.time() - started:.0f} s; {sum(args.train_counts)} "
          f"training cases (generator seed {args.data_seed}), {args.steps} steps, seeds 1..{args.seeds}\n")
    print("| arm | whole-pancreas Dice | lesion Dice | macro F1 | best lesion Dice (step) | drop to the end |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, runs in results.items():
        cells = [mean_sd([run["final"][m] for run in runs]) for m in METRICS]
        best = mean_sd([run["best_lesion"] for run in runs])
        steps = "/".join(str(run["best_lesion_step"]) for run in runs)
        print(f"| {ARMS[arm][0]} | {' | '.join(cells)} | {best} ({steps}) | {mean_sd([run['lesion_drop'] for run in runs])} |")
    steps = [row["step"] for row in next(iter(results.values()))[0]["curve"]]
    print("\nlesion Dice by step (mean over seeds):\n")
    print(f"| arm | {' | '.join(str(s) for s in steps)} |")
    print(f"| --- |{' --- |' * len(steps)}")
    for arm, runs in results.items():
        means = [statistics.mean(run["curve"][i][METRICS[1]] for run in runs) for i in range(len(steps))]
        print(f"| {arm} | {' | '.join(f'{m:.3f}' for m in means)} |")


if __name__ == "__main__":
    main()
