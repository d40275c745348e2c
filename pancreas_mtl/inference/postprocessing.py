"""Optional clean-up of a predicted label map: keep the largest connected component of the pancreas and
of the lesion.

Label maps are (Z, Y, X) with 0 background, 1 pancreas, 2 lesion. Components are 26-connected (any
shared face, edge or corner), so a thin gland on a coarse grid is not cut into pieces.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pancreas_mtl.planning.plan import LESION_LABEL

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself when it has at most one)."""
    components, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def keep_largest_components(labels: np.ndarray, pancreas: bool = True, lesion: bool = True,
                            lesion_label: int = LESION_LABEL, pancreas_label: int = 1) -> np.ndarray:
    """Postprocess a label map; returns a new array of the same dtype.

    Args:
        pancreas: keep only the largest component of the whole pancreas (every label > 0); the rest
            becomes background.
        lesion: keep only the largest lesion component; other lesion voxels become pancreas (they lie
            in the predicted gland, so the whole-pancreas mask does not change).
    """
    result = labels.copy()
    if pancreas and (result > 0).any():
        result[~largest_component(result > 0)] = 0
    if lesion:
        lesion_mask = result == lesion_label
        if lesion_mask.any():
            result[lesion_mask & ~largest_component(lesion_mask)] = pancreas_label
    return result
