"""From a prediction on the plan's grid back to the input's grid, and writing the outputs atomically.

Undoing preprocessing, in reverse order, on the prediction's device: the class probabilities
(K, z', y', x') are resampled to the crop's shape (linear, with preprocessing's separate-axis rule and
threshold, the plan's grid now being the source), their argmax taken, and the crop padded back into
the original shape with background outside it. Probabilities are resampled, never the argmax, so
boundaries stay smooth. nnU-Net resamples logits instead (``logits=True``, for
``inference.nnunet_compat``); the two argmaxes differ where a voxel lies between classes.

Every file is written under a temporary name in its folder and renamed (``os.replace``), so a reader
or a rerun never sees a half-written file. Masks keep the source file's NIfTI header and affine and
are stored as uint8; arrays are (Z, Y, X) in memory, (x, y, z) on disk (``pancreas_mtl.raw.io``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from pancreas_mtl.raw.io import NIFTI_SUFFIXES, image_suffix, write_nifti
from pancreas_mtl.dataset.preprocessing import PreprocessedCase
from pancreas_mtl.dataset.resampling import resample_image
from pancreas_mtl.files import atomic_path
from pancreas_mtl.planning.anisotropy import separate_axis


def restore_original_geometry(probabilities: Tensor, preprocessed: PreprocessedCase,
                              target_spacing: Sequence[float], keep_probabilities: bool = False,
                              logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Label map (and optionally probabilities) on the input's grid from probabilities on the plan's grid.

    Args:
        probabilities: (K, z', y', x') class probabilities on the plan's grid (any device); with
            ``logits``, logits, resampled as they are and turned into probabilities afterwards.
        preprocessed: the case's crop box, original shape and spacing and the plan's anisotropy threshold
            (``preprocess``'s output).
        target_spacing: the plan's (z, y, x) spacing the probabilities are at.
        keep_probabilities: also return the probabilities on the input's grid.

    Returns (Z, Y, X) uint8 labels, and (K, Z, Y, X) float16 probabilities (background 1 outside the
    crop) or None.
    """
    bbox = preprocessed.bbox
    crop_shape = tuple(stop - start for start, stop in bbox)
    # going back the plan's grid is the source: nnU-Net asks it first
    # (convert_predicted_logits_to_segmentation_with_correct_shape)
    axis = separate_axis(target_spacing, preprocessed.original_spacing, preprocessed.anisotropy_threshold)
    with torch.inference_mode():
        resampled = resample_image(probabilities.float(), crop_shape, axis)
        crop_labels = resampled.argmax(dim=0).to(torch.uint8).cpu().numpy()
        if keep_probabilities:
            resampled = resampled.softmax(dim=0) if logits else resampled
            crop_probabilities = resampled.half().cpu().numpy()
        else:
            crop_probabilities = None
    region = tuple(slice(start, stop) for start, stop in bbox)
    labels = np.zeros(preprocessed.original_shape, dtype=np.uint8)
    labels[region] = crop_labels
    if crop_probabilities is None:
        return labels, None
    full = np.zeros((crop_probabilities.shape[0], *preprocessed.original_shape), dtype=np.float16)
    full[0] = 1.0
    full[(slice(None), *region)] = crop_probabilities
    return labels, full


def source_header(image_path: str | Path) -> nib.Nifti1Header | None:
    """The NIfTI header of a source image (for the mask written beside it), None for ITK formats."""
    if image_suffix(image_path) not in NIFTI_SUFFIXES:
        return None
    header = nib.load(str(image_path)).header
    if not isinstance(header, nib.Nifti1Header):  # NIfTI-2 sources get a NIfTI-1 mask with the same affine
        return None
    header = header.copy()
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0
    return header


def write_mask(labels: np.ndarray, affine: np.ndarray, path: str | Path, reference_image: str | Path) -> Path:
    """labels (Z, Y, X) written as uint8 NIfTI with ``affine`` and the reference image's header, atomically."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    return write_nifti(labels, affine, path, header=source_header(reference_image))


def _atomic(path: Path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_probabilities(path: str | Path, probabilities: np.ndarray, subtype_probabilities: Sequence[float] | None
                        ) -> Path:
    """``.npz`` with ``probabilities`` (K, Z, Y, X) float16 on the input grid (z, y, x axis order) and
    ``subtype_probabilities`` (K_subtypes,) float32 (empty without a head), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez_compressed(stream, probabilities=probabilities.astype(np.float16, copy=False),
                                subtype_probabilities=np.asarray(subtype_probabilities if subtype_probabilities
                                                                 is not None else [], dtype=np.float32))
    return _atomic(Path(path), write)
