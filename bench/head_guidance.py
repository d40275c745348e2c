"""How a checkpoint's subtype head depends on the lesion map that guides its pooling.

    .venv/bin/python bench/head_guidance.py --ckpt outputs/runs/cpu_demo/<run>/checkpoints/last.ckpt
    .venv/bin/python bench/head_guidance.py --ckpt ... --split train --cases 60

For every case of a split (default: validation) of a dataset root (default: the built-in synthetic
set), one patch of the plan's size centred on the true lesion (the case zero-padded to at least the
patch) goes through the network once; the head (``lesion_attention``, or any head that takes a
lesion mask) is then scored with each guide:

- ``predicted``: the network's own lesion probability, as at inference;
- ``true``: the true lesion mask, as truth guidance uses it in training;
- ``true dilated``: the true mask grown by one voxel, a stand-in for a prediction whose boundary is
  one voxel off.

A head that is good with ``true`` and poor with the other two has learned to read exact mask
boundaries; one that is poor with ``true`` too has not learned the subtypes. Prints macro F1 and the
confusion matrix per guide, plus the mean lesion Dice of the patches (docs/benchmarks.md, CPU demo).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench._machine import cpu_model  # noqa: E402
from pancreas_mtl.raw.checks import load_case  # noqa: E402
from pancreas_mtl.raw.layout import discover  # noqa: E402
from pancreas_mtl.dataset.preprocessing import preprocess  # noqa: E402
from pancreas_mtl.evaluation.metrics import confusion_matrix, dice, macro_f1  # noqa: E402
from pancreas_mtl.inference.checkpoint import load_network  # noqa: E402

GUIDES = ("predicted", "true", "true dilated")


def lesion_patch(image: torch.Tensor, seg: torch.Tensor, patch: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """image (1, C, Z, Y, X), seg (Z, Y, X) -> the patch-sized crop centred on the lesion (zero padding
    where the case is smaller than the patch): image (1, C, *patch), seg (*patch)."""
    pad = [max(0, p - s) for s, p in zip(seg.shape, patch)]
    widths = [w for axis in (2, 1, 0) for w in (pad[axis] // 2, pad[axis] - pad[axis] // 2)]
    image, seg = F.pad(image, widths), F.pad(seg, widths)
    centre = (seg == 2).nonzero().float().mean(0).round().long()
    region = []
    for axis, size in enumerate(patch):
        start = int(min(max(int(centre[axis]) - size // 2, 0), seg.shape[axis] - size))
        region.append(slice(start, start + size))
    return image[(slice(None), slice(None), *region)], seg[tuple(region)]


@torch.no_grad()
def score(ckpt: Path, root: Path, split: str, max_cases: int | None) -> tuple[dict, np.ndarray, float]:
    network, plan, _ = load_network(ckpt)
    network.eval()
    head = network.head
    if head is None or not getattr(head, "uses_lesion_mask", False):
        raise SystemExit(f"{ckpt}: the head ({type(head).__name__}) does not take a lesion mask")
    lesion = int(plan.labels["lesion"])
    cases = [c for c in discover(root).cases if c.split == split and c.subtype is not None]
    cases = [c for c in cases if c.label_path is not None][:max_cases]
    if not cases:
        raise SystemExit(f"{root}: no labelled cases with a subtype in split {split!r}")
    predicted = {guide: [] for guide in GUIDES}
    truth, dices = [], []
    for case in cases:
        prepared = preprocess(load_case(case), plan)
        if not (prepared.seg == lesion).any():
            continue
        image, seg = lesion_patch(torch.from_numpy(prepared.image)[None],
                                  torch.from_numpy(prepared.seg.astype(np.int64)), tuple(plan.patch_size))
        unet = network.backbone(image, deep_supervision=False)
        true_mask = (seg == lesion).float()[None, None]
        guides = {"predicted": None, "true": true_mask,
                  "true dilated": F.max_pool3d(true_mask, kernel_size=3, stride=1, padding=1)}
        # the head's training switch picks the given mask, as it is (no jitter); dropout stays in eval mode
        saved = head.truth_guidance, getattr(head, "truth_jitter", 0)
        head.truth_guidance, head.truth_jitter = 1.0, 0
        for guide, mask in guides.items():
            head.training = mask is not None
            logits = network.classify(unet, image, mask)
            predicted[guide].append(int(logits.argmax(dim=1)))
        head.training = False
        head.truth_guidance, head.truth_jitter = saved
        truth.append(int(case.subtype))
        dices.append(dice((unet.seg_logits[0].argmax(dim=1)[0] == lesion).numpy(), (seg == lesion).numpy()))
    k = plan.num_subtypes
    truth = np.array(truth)
    results = {guide: (macro_f1(truth, np.array(p), k), confusion_matrix(truth, np.array(p), k))
               for guide, p in predicted.items()}
    return results, truth, float(np.mean(dices))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "outputs/data/synthetic_default",
                        help="dataset root (either layout) with subtypes")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--cases", type=int, default=None, help="at most this many cases")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results, truth, lesion_dice = score(args.ckpt, args.data, args.split, args.cases)
    print(f"# {cpu_model()}; {date.today()}; `python bench/head_guidance.py {' '.join(sys.argv[1:])}`")
    print(f"# {len(truth)} {args.split} cases, one lesion-centred patch each; mean lesion Dice of the "
          f"patches {lesion_dice:.3f}\n")
    print("| guide | macro F1 | confusion (rows: truth) |")
    print("| --- | --- | --- |")
    for guide, (f1, confusion) in results.items():
        print(f"| {guide} | {f1:.3f} | {' '.join(str(list(row)) for row in confusion.tolist())} |")


if __name__ == "__main__":
    main()
