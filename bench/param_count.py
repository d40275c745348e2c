"""Parameter counts of the residual encoder UNet for the planning presets on the quiz geometry.

    .venv/bin/python bench/param_count.py [--presets M L small] [--spacing-scale 1.0]

Builds each network on the meta device (no memory, no forward) from a plan of a quiz-like
fingerprint (median spacing 2.0 x 0.7363 x 0.7363 mm, shape 60 x 119 x 184, (z, y, x)) and prints a
markdown table row per preset; with dynamic-network-architectures installed it adds nnU-Net's count.
"""

from __future__ import annotations

import argparse
import pydoc

import torch

from pancreas_mtl.models import ResEncUNet, count_parameters
from pancreas_mtl.models.nnunet_plans import architecture_from_model
from pancreas_mtl.planning.plan import ChannelIntensity, Fingerprint
from pancreas_mtl.planning.planner import load_preset, plan_experiment


def quiz_like_fingerprint(n: int = 40) -> Fingerprint:
    ct = ChannelIntensity(mean=74.9, std=44.1, percentile_00_5=-56.0, percentile_99_5=180.0, median=76.0,
                          min=-1024.0, max=3071.0)
    return Fingerprint(case_ids=[f"quiz_{i:03d}" for i in range(n)], spacings=[(2.0, 0.7363, 0.7363)] * n,
                       shapes_after_crop=[(60, 119, 184)] * n, intensity=[ct], label_voxel_counts={},
                       subtype_counts={0: 1, 1: 1, 2: 1})


def nnunet_count(model: ResEncUNet) -> int | None:
    """nnU-Net's ResidualEncoderUNet built from the exported plans entry, or None if not installed."""
    architecture = architecture_from_model(model)
    network_class = pydoc.locate(architecture["network_class_name"])
    if network_class is None:
        return None
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        kwargs[key] = pydoc.locate(kwargs[key]) if kwargs[key] is not None else None
    with torch.device("meta"):
        network = network_class(input_channels=model.arch["in_channels"], num_classes=model.arch["num_classes"],
                                **kwargs)
    return count_parameters(network)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["M", "L", "small"])
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    args = parser.parse_args()
    print("| preset | patch (z, y, x) | stages | features | parameters | nnU-Net's |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        plan = plan_experiment(quiz_like_fingerprint(), load_preset(preset), {"spacing_scale": args.spacing_scale})
        with torch.device("meta"):
            model = ResEncUNet.from_plan(plan)
        theirs = nnunet_count(model)
        print(f"| {preset} | {' x '.join(map(str, plan.patch_size))} | {plan.num_stages} | "
              f"{plan.features_per_stage} | {count_parameters(model):,} | "
              f"{'-' if theirs is None else f'{theirs:,}'} |")


if __name__ == "__main__":
    main()
