"""Shared fixtures: small hand-made datasets written to a temporary folder in both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# The suite runs as two xdist workers on two cores: one thread each avoids oversubscription,
# which made small forward passes a hundred times slower.
torch.set_num_threads(1)

from pancreas_mtl.raw.io import write_nifti
# in-process inference is torch; tests marked engines run OpenVINO / ONNX Runtime in forked children
from tests.forked import cpu_engines_kept_out_of_the_worker, pytest_runtest_protocol  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = REPO_ROOT.parent / "shared" / "data" / "ct"


def lps_affine(spacing_zyx=(2.0, 0.8, 0.8), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """An LPS-oriented NIfTI affine (x and y flipped) like the quiz data's, for spacing (z, y, x)."""
    dz, dy, dx = spacing_zyx
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = origin
    return affine


def make_case_arrays(rng: np.random.Generator, shape_zyx=(12, 28, 36), lesion_offset=(0, 0, 0)):
    """(image int16, mask uint8) in (Z, Y, X): fat background, an ellipsoid pancreas, a lesion inside."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    centre = np.array(shape_zyx) / 2
    radii = np.array(shape_zyx) / np.array([3.0, 3.0, 2.5])
    pancreas = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 < 1
    lesion_centre = centre + np.array(lesion_offset)
    lesion = ((z - lesion_centre[0]) / 2.0) ** 2 + ((y - lesion_centre[1]) / 3.0) ** 2 + ((x - lesion_centre[2]) / 3.0) ** 2 < 1
    lesion &= pancreas
    image = rng.normal(-100, 20, shape_zyx)
    image[pancreas] = rng.normal(100, 15, pancreas.sum())
    image[lesion] = rng.normal(60, 15, lesion.sum())
    mask = np.zeros(shape_zyx, dtype=np.uint8)
    mask[pancreas] = 1
    mask[lesion] = 2
    return image.astype(np.int16), mask


def write_distributed_dataset(root: Path, train_per_subtype=2, validation_per_subtype=1, test_cases=2, seed=0,
                              spacing=(2.0, 0.8, 0.8)) -> Path:
    rng = np.random.default_rng(seed)
    number = 0
    for split, count in (("train", train_per_subtype), ("validation", validation_per_subtype)):
        for subtype in range(3):
            for _ in range(count):
                number += 1
                case_id = f"quiz_{subtype}_{number:03d}"
                image, mask = make_case_arrays(rng)
                folder = root / split / f"subtype{subtype}"
                write_nifti(image, lps_affine(spacing), folder / f"{case_id}_0000.nii.gz")
                write_nifti(mask, lps_affine(spacing), folder / f"{case_id}.nii.gz")
    for _ in range(test_cases):
        number += 1
        image, _ = make_case_arrays(rng)
        write_nifti(image, lps_affine(spacing), root / "test" / f"quiz_{number:03d}_0000.nii.gz")
    return root


@pytest.fixture
def distributed_dataset(tmp_path: Path) -> Path:
    return write_distributed_dataset(tmp_path / "quiz")
