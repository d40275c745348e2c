"""Do the CPU engines give a trained network's masks and subtypes? ``predict.py`` once per engine and
precision on the same inputs, compared with torch fp32 case by case.

    .venv/bin/python bench/engine_agreement.py --ckpt outputs/runs/cpu_demo/<run>/checkpoints/last.ckpt \
        --input outputs/data/synthetic_default/validation ../shared/data/ct --subtypes-from-folders

Per variant (``torch:fp32`` is the reference; default also ``openvino:fp32``, ``openvino:bf16``,
``onnxruntime:fp32``): Dice of its mask to the reference mask per label (pancreas = labels 1 and 2,
lesion = 2; mean and minimum over the cases), the largest difference of a subtype probability, how many
predicted subtypes differ, and, with the true subtypes (a distributed layout's ``subtypeK`` folders),
each variant's macro F1. Predictions go to a temporary folder (``--keep`` to keep them); ``inference=fast``
unless ``--inference``. Results are printed as a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench._machine import cpu_model  # noqa: E402
from pancreas_mtl.evaluation.metrics import macro_f1  # noqa: E402

DEFAULT_VARIANTS = ("torch:fp32", "openvino:fp32", "openvino:bf16", "onnxruntime:fp32")


def predict(ckpt: Path, source: Path, out: Path, engine: str, precision: str, inference: str) -> None:
    subprocess.run([sys.executable, "predict.py", f"ckpt={ckpt}", f"input={source}", f"output={out}",
                    f"inference={inference}", f"inference.engine={engine}", f"precision={precision}",
                    "device=cpu"], cwd=REPO_ROOT, check=True)


def read_probabilities(folder: Path) -> dict[str, np.ndarray]:
    path = folder / "subtype_probabilities.csv"
    if not path.is_file():
        return {}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = sorted((c for c in rows[0] if re.fullmatch(r"p\d+", c)), key=lambda c: int(c[1:])) if rows else []
    return {row["Names"].removesuffix(".nii.gz"): np.array([float(row[c]) for c in columns]) for row in rows}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def true_subtypes(sources: list[Path]) -> dict[str, int]:
    """Case id -> subtype from ``subtypeK`` folders of a distributed layout (images ``{case}_0000.nii.gz``)."""
    found = {}
    for source in sources:
        for image in source.glob("subtype*/*_0000.nii.gz"):
            found[image.name.removesuffix("_0000.nii.gz")] = int(image.parent.name.removeprefix("subtype"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="folders or files predict.py reads")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--inference", default="fast")
    parser.add_argument("--keep", type=Path, default=None, help="keep the predictions under this folder")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="engine_agreement_"))
    truth = true_subtypes(args.input)
    masks: dict[str, dict[str, np.ndarray]] = {}
    probabilities: dict[str, dict[str, np.ndarray]] = {}
    for variant in args.variants:
        engine, precision = variant.split(":")
        masks[variant], probabilities[variant] = {}, {}
        for number, source in enumerate(args.input):
            out = root / variant.replace(":", "_") / f"input{number}"
            predict(args.ckpt, source, out, engine, precision, args.inference)
            for path in sorted(out.glob("*.nii.gz")):
                masks[variant][path.name.removesuffix(".nii.gz")] = np.asarray(nib.load(path).dataobj)
            probabilities[variant].update(read_probabilities(out))

    reference = args.variants[0]
    print(f"\nengine agreement, {date.today()}, {cpu_model()}, {args.ckpt}, inference={args.inference}, "
          f"{len(masks[reference])} cases; reference {reference}\n")
    print("| variant | pancreas Dice to reference, mean (min) | lesion Dice, mean (min) | max subtype probability "
          "difference | subtypes changed | macro F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in args.variants:
        cases = sorted(masks[reference])
        pancreas = [dice(masks[variant][c] > 0, masks[reference][c] > 0) for c in cases]
        lesion = [dice(masks[variant][c] == 2, masks[reference][c] == 2) for c in cases]
        shared = sorted(set(probabilities[variant]) & set(probabilities[reference]))
        gap = max((float(np.abs(probabilities[variant][c] - probabilities[reference][c]).max()) for c in shared),
                  default=float("nan"))
        changed = sum(int(probabilities[variant][c].argmax() != probabilities[reference][c].argmax()) for c in shared)
        labelled = [c for c in shared if c in truth]
        f1 = (macro_f1(np.array([truth[c] for c in labelled]),
                       np.array([probabilities[variant][c].argmax() for c in labelled]), 3) if labelled else None)
        print(f"| {variant} | {np.mean(pancreas):.4f} ({np.min(pancreas):.4f}) | {np.mean(lesion):.4f} "
              f"({np.min(lesion):.4f}) | {gap:.4f} | {changed} of {len(shared)} | "
              f"{'-' if f1 is None else f'{f1:.3f}'} |")
    print(f"\npredictions: {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
