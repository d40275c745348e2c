"""The ``pancreas-mtl`` command: dataset tools (generate synthetic data, convert layouts, check a dataset).

Training and prediction have their own Hydra entry points, ``train.py`` and ``predict.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from pancreas_mtl.data.errors import DatasetError


def _generate(args: argparse.Namespace) -> int:
    from pancreas_mtl.synthetic.generator import generate_dataset, load_config

    config = load_config(args.size)
    if args.seed is not None:
        config.seed = args.seed
    root = generate_dataset(Path(args.out), config, overwrite=args.overwrite)
    print(f"synthetic dataset ({args.size}, seed {config.seed}) in {root}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pancreas_mtl.data.layout import convert_to_nnunet

    index = convert_to_nnunet(args.source, args.destination, dataset_name=args.name, link=args.link,
                              overwrite=args.overwrite)
    print(f"wrote nnU-Net v2 raw dataset {index.root}: {len(index.labelled)} training case(s), "
          f"{len(index.split('test'))} test case(s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pancreas_mtl.data.layout import discover
    from pancreas_mtl.data.limits import InputLimits
    from pancreas_mtl.planning.fingerprint import compute_fingerprint

    index = discover(args.root, num_subtypes=args.num_subtypes)
    splits = Counter(case.split for case in index.cases)
    print(f"{index.root}: {index.layout} layout, channels {index.channel_names}, labels {index.labels}")
    print("cases: " + ", ".join(f"{split} {count}" for split, count in sorted(splits.items())))
    limits = InputLimits()  # the defaults of data.limits (conf/limits/default.yaml)
    fingerprint = compute_fingerprint(index, num_workers=args.workers, limits=limits)
    spacings = sorted(fingerprint.spacings)
    print(f"all {len(fingerprint.case_ids)} labelled case(s) readable and consistent (spacing "
          f"{limits.min_spacing_mm:g} to {limits.max_spacing_mm:g} mm, at most "
          f"{limits.max_image_voxels:,} voxels)")
    print(f"subtypes: {fingerprint.subtype_counts}; label voxels: {fingerprint.label_voxel_counts}")
    print(f"spacing (z, y, x) median {spacings[len(spacings) // 2]}")
    for channel, stats in zip(index.channel_names.values(), fingerprint.intensity):
        print(f"{channel}: foreground p0.5 {stats.percentile_00_5:.1f}, p99.5 {stats.percentile_99_5:.1f}, "
              f"mean {stats.mean:.1f}, std {stats.std:.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pancreas-mtl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="write the built-in synthetic CT dataset (distributed layout)")
    generate.add_argument("--size", default="default", help="preset in conf/synthetic/: tiny, default or full")
    generate.add_argument("--out", required=True,
                          help="folder to write the dataset into: new, empty, or one it generated")
    generate.add_argument("--seed", type=int, default=None, help="overrides the preset's seed")
    generate.add_argument("--overwrite", action="store_true",
                          help="replace a dataset the generator wrote there: only the files its "
                               "synthetic.json lists are removed; a folder holding anything else is "
                               "refused either way")
    generate.set_defaults(run=_generate)

    convert = commands.add_parser("convert", help="convert the distributed layout to an nnU-Net v2 raw dataset")
    convert.add_argument("source", help="folder with train/, validation/, test/")
    convert.add_argument("destination", help="nnU-Net raw dataset folder to create, e.g. Dataset501_Pancreas")
    convert.add_argument("--name", default=None, help="dataset name in dataset.json (default: source folder name)")
    convert.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an earlier conversion: only the files its conversion.json lists are "
                              "removed; a folder holding anything else is refused either way")
    convert.set_defaults(run=_convert)

    check = commands.add_parser("check", help="read every case of a dataset and report every problem found")
    check.add_argument("root", help="dataset folder in either layout")
    check.add_argument("--workers", type=int, default=2, help="worker processes (0: none)")
    check.add_argument("--num-subtypes", type=int, default=3)
    check.set_defaults(run=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DatasetError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
