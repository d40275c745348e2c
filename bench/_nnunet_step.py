"""nnU-Net v2's own training step, timed; run by bench/train_throughput.py with .venv-nnunet's python.

Imports only torch, numpy and nnU-Net's packages (nnunetv2 and what it ships with: batchgeneratorsv2,
dynamic-network-architectures), never pancreas_mtl. The real ``nnUNetTrainer`` is built from the
plans.json / dataset.json that train_throughput.py writes for the same network and patch, and
``trainer.initialize()`` makes its network (``get_network_from_plans``), its loss (``DC_and_CE_loss``
in ``DeepSupervisionWrapper`` with its 1/2^i weights), SGD (lr 0.01, Nesterov momentum 0.99,
weight decay 3e-5), the GradScaler on CUDA, and ``torch.compile`` where nnU-Net does it (CUDA, unless
``nnUNet_compile`` says no). Then its own ``trainer.train_step(batch)`` is timed: zero_grad, autocast on
CUDA only, forward, loss, backward, clip_grad_norm_ 12, step, and the loss copied to the host.

Not timed, as in nnU-Net where data-loader workers do it: the deep-supervision targets
(``DownsampleSegForDSTransform``, int16 like its data loader's), pinned on CUDA.

    .venv-nnunet/bin/python bench/_nnunet_step.py --workdir DIR [--device cuda] [--compile]

DIR holds plans.json, dataset.json, image.npy (B, C, Z, Y, X) float32 and label.npy (B, 1, Z, Y, X).
Prints one line ``RESULT {json}`` at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path


def set_nnunet_paths(workdir: Path, compile_network: bool) -> None:
    """nnU-Net's environment, before anything of nnunetv2 is imported."""
    for name in ("raw", "preprocessed", "results"):
        folder = workdir / f"nnunet_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{name}"] = str(folder)
    os.environ["nnUNet_compile"] = "t" if compile_network else "f"
    os.environ["nnUNet_wandb_enabled"] = "0"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="nnU-Net's torch.compile (its CUDA default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="initial weights")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on CPU (0: nnUNetv2_train's choice, every core)")
    args = parser.parse_args(argv)

    set_nnunet_paths(args.workdir, args.compile)
    import numpy as np
    import torch
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.backends import cudnn

    # what nnUNetv2_train sets for its -device (nnunetv2/run/run_training.py)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)

    plans = json.loads((args.workdir / "plans.json").read_text())
    dataset_json = json.loads((args.workdir / "dataset.json").read_text())
    configuration = "3d_fullres"
    # initialize() infers the dataset class from the preprocessed folder's file ending; one empty file does
    preprocessed = (Path(os.environ["nnUNet_preprocessed"]) / plans["dataset_name"]
                    / plans["configurations"][configuration]["data_identifier"])
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "placeholder.b2nd").touch()

    torch.manual_seed(args.seed)
    plans["continue_training"] = False  # what run_training adds before building the trainer
    trainer = nnUNetTrainer(plans, configuration, 0, dataset_json, device)
    trainer.initialize()
    if device.type == "cuda":  # as run_training does before training
        cudnn.deterministic = False
        cudnn.benchmark = True
    trainer.on_train_epoch_start()  # network.train(), poly lr for epoch 0

    image = torch.from_numpy(np.load(args.workdir / "image.npy")).float()
    label = torch.from_numpy(np.load(args.workdir / "label.npy")).to(torch.int16)
    downsample = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales())
    per_sample = [downsample(segmentation=label[b])["segmentation"] for b in range(label.shape[0])]
    target = [torch.stack([sample[i] for sample in per_sample]) for i in range(len(per_sample[0]))]
    if device.type == "cuda":
        image, target = image.pin_memory(), [t.pin_memory() for t in target]
        torch.cuda.reset_peak_memory_stats()
    batch = {"data": image, "target": target}

    times, warmup_times, losses = [], [], []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(float(output["loss"]))
        (times if step >= args.warmup else warmup_times).append(elapsed)
        print(f"nnU-Net step {step} ({'warm-up' if step < args.warmup else 'timed'}): {elapsed:.3f} s, "
              f"loss {losses[-1]:.4f}", file=sys.stderr, flush=True)

    network = trainer.network._orig_mod if hasattr(trainer.network, "_orig_mod") else trainer.network
    result = {
        "times": times, "warmup_times": warmup_times, "losses": losses,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
        "dynamic_network_architectures": version("dynamic-network-architectures"),
        "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in network.parameters()),
        "network": type(network).__name__, "loss": type(trainer.loss).__name__,
        "compiled": trainer._do_i_compile(), "amp": device.type == "cuda",
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
