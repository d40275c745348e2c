"""Throughput of patch sampling + augmentation: patches per second for one worker, on synthetic cached cases.

Writes a few cache entries of realistic size (the quiz data's median resampled shape is 59 x 118 x 181,
docs/REFERENCE.md section 1) to a temporary folder, then times PatchDataset items in this process with
one torch thread, as one DataLoader worker runs them. Prints one markdown table row per patch size:

    python bench/sampling_throughput.py                   # nnU-Net's patch (64, 128, 192) and the demo's (32, 64, 96)
    python bench/sampling_throughput.py --samples 200 --workers 2   # also time a DataLoader with 2 workers

Columns: patches/s without augmentation (the sampler reads exactly the patch), with nnU-Net's default
augmentation (conf/augmentation/nnunet.yaml; the sampler reads the enlarged region) and with the light
preset, each composed by Hydra as a run composes it; data.sampling as conf/data/folder.yaml has it.
Reference: nnU-Net v2 itself loads and augments 7.5 patches/s on one core of the project's 2-core CPU
at (64, 128, 192) (docs/REFERENCE.md section 2b).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from scipy import ndimage
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _machine import cpu_model  # bench/ is on sys.path when a script runs

from pancreas_mtl.config import config_dir
from pancreas_mtl.dataset.augmentation import augmentation_region_size, build_augmentation
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.dataset.sampling import PatchDataset, PatchSampler, collate_patches
from pancreas_mtl.dataset.settings import AugmentationSettings, augmentation_settings, sampling_settings

# (Z, Y, X) around the quiz data's median resampled shape, smallest to largest.
CASE_SHAPES = [(60, 120, 180), (48, 110, 170), (72, 130, 200), (40, 90, 140)]
PRESETS = ("none", "nnunet", "light")


def write_synthetic_case(folder: Path, case_id: str, shape, subtype: int, rng: np.random.Generator) -> CachedCase:
    """One cache entry: smooth z-scored image (1, Z, Y, X), an ellipsoid pancreas with a lesion inside."""
    coarse = rng.standard_normal([max(2, s // 8) for s in shape])
    image = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[None].astype(np.float32)
    image += 0.1 * rng.standard_normal(image.shape, dtype=np.float32)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = np.array(shape) * rng.uniform(0.4, 0.6, 3)
    radii = np.array(shape) * np.array([0.2, 0.15, 0.3])
    pancreas = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) < 1
    lesion_centre = centre + radii * rng.uniform(-0.4, 0.4, 3)
    lesion = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), lesion_centre, radii * 0.3)) < 1
    seg = np.zeros(shape, dtype=np.int8)
    seg[pancreas] = 1
    seg[pancreas & lesion] = 2
    rows = []
    for label in (1, 2):
        voxels = np.argwhere(seg == label)
        voxels = voxels[rng.choice(len(voxels), min(len(voxels), 10_000), replace=False)]  # nnU-Net keeps <= 10k
        rows.append(np.concatenate([np.full((len(voxels), 1), label), voxels], axis=1))
    np.save(folder / f"{case_id}_image.npy", image)
    np.save(folder / f"{case_id}_seg.npy", seg)
    np.save(folder / f"{case_id}_fg.npy", np.concatenate(rows).astype(np.int32))
    properties = {"case_id": case_id, "subtype": subtype, "shape_after_preprocessing": list(shape), "has_label": True}
    (folder / f"{case_id}.json").write_text(json.dumps(properties))
    return CachedCase.from_properties(folder, properties)


def augmentation_preset(name: str) -> AugmentationSettings:
    """conf/augmentation/{name}.yaml composed by Hydra (light and none build on nnunet.yaml)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return augmentation_settings(compose(overrides=[f"+augmentation={name}"]).augmentation)


def make_dataset(cases, patch, preset: str, samples: int, seed: int) -> PatchDataset:
    cfg = augmentation_preset(preset)
    sampler = PatchSampler(cases, patch, augmentation_region_size(cfg, patch), **asdict(sampling_settings()))
    return PatchDataset(sampler, build_augmentation(cfg, patch), samples_per_epoch=samples, seed=seed)


def patches_per_second(dataset: PatchDataset, warmup: int = 3) -> float:
    """Items per second drawn in this process (one worker's throughput)."""
    for index in range(warmup):
        dataset[index]
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset) / (time.perf_counter() - start)


def loader_patches_per_second(dataset: PatchDataset, workers: int, batch_size: int = 2) -> float:
    """Patches per second through a DataLoader with ``workers`` processes (all of them together)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_patches,
                        persistent_workers=True, prefetch_factor=2)
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in iterator)
    return count / (time.perf_counter() - start)




def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, action="append", metavar=("Z", "Y", "X"),
                        help="patch size; repeat for several (default: 64 128 192 and 32 64 96)")
    parser.add_argument("--cases", type=int, default=8, help="synthetic cases to write")
    parser.add_argument("--samples", type=int, default=60, help="patches timed per configuration")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    patches = [tuple(p) for p in args.patch] if args.patch else [(64, 128, 192), (32, 64, 96)]

    torch.set_num_threads(1)  # what a DataLoader worker gets
    rng = np.random.default_rng(args.seed)
    machine = f"{cpu_model()} ({os.cpu_count()} cores)"
    date = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="sampling_bench_") as tmp:
        cases = [write_synthetic_case(Path(tmp), f"bench_{i:03d}", CASE_SHAPES[i % len(CASE_SHAPES)], i % 3, rng)
                 for i in range(args.cases)]
        print(f"{len(cases)} synthetic cases, shapes {sorted({c.shape for c in cases})}, {args.samples} patches "
              f"per configuration, 1 torch thread, torch {torch.__version__}", file=sys.stderr)
        header = ["machine", "date", "patch (z, y, x)", "region read with nnU-Net aug"]
        header += [f"{p} patches/s/worker" for p in args.presets]
        if args.workers:
            header += [f"{p} patches/s, {args.workers} workers" for p in args.presets]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for patch in patches:
            region = augmentation_region_size(augmentation_preset("nnunet"), patch)
            row = [machine, date, "x".join(map(str, patch)), "x".join(map(str, region))]
            for preset in args.presets:
                row.append(f"{patches_per_second(make_dataset(cases, patch, preset, args.samples, args.seed)):.1f}")
            if args.workers:
                torch.set_num_threads(os.cpu_count() or 1)
                for preset in args.presets:
                    dataset = make_dataset(cases, patch, preset, args.samples, args.seed)
                    row.append(f"{loader_patches_per_second(dataset, args.workers):.1f}")
                torch.set_num_threads(1)
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
