"""The lesion of a synthetic case: its size and place (the same for every subtype) and its look (per subtype).

A lesion is an ellipsoid of a drawn volume whose outline is lobulated and roughened, then cut to
exactly that volume: the N voxels of smallest perturbed radius, so lesion volume never depends on
the subtype. Inside it: a contrast to the pancreas, mottled texture, septa between loculi, and a rim.
Only the strengths of these (``draw_lesion_appearance``) depend on the subtype; every random field
and point they modulate is drawn the same way for every subtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from pancreas_mtl.synthetic.anatomy import Grid, PancreasShape, edge_weight, paint, smooth_noise

APPEARANCE_KEYS = ("contrast_hu", "mottle_hu", "septa_hu", "loculi", "rim_hu", "lobulation", "irregularity",
                   "edge_blur_mm")
_LOBES = 5
_FAR = np.float32(1e6)  # normalised radius outside the region a lesion may take


@dataclass
class LesionGeometry:
    """Where the lesion is and how big; drawn from the anatomy stream, independent of the subtype."""

    centre: np.ndarray      # (z, y, x) mm
    radii: np.ndarray       # (3,) mm, the nominal ellipsoid of the lesion's volume, in the lesion's frame
    rotation: np.ndarray    # (3, 3): world offsets (z, y, x) -> lesion frame
    voxels: int             # the lesion's exact size in voxels
    envelope: float         # the outline stays within this normalised radius of the nominal ellipsoid
    position: float         # along the gland, 0 head to 1 tail


@dataclass
class LesionStructure:
    """The random structure in the lesion's box, drawn the same way for every subtype."""

    box: tuple[slice, slice, slice]
    local: list[np.ndarray]   # voxel offsets (3 arrays, box shape) in the lesion's frame, mm
    rho_nominal: np.ndarray   # normalised radius of the nominal ellipsoid
    lobes: np.ndarray         # in [-1, 1], a smooth function of direction: where the outline bulges
    roughness: np.ndarray     # unit-std fine field that roughens the outline
    mottle: np.ndarray        # unit-std texture field
    seeds: np.ndarray         # (K, 3) loculus centres in the lesion's frame, mm
    loculus_offsets: np.ndarray  # (K,) unit-std density offset of each loculus


@dataclass
class LesionOutline:
    """The lesion within ``LesionStructure.box``: ``rho <= theta``, exactly the drawn number of voxels."""

    rho: np.ndarray
    theta: float

    @property
    def mask(self) -> np.ndarray:
        return self.rho <= self.theta


def _subtype_range(config, key: str, subtype: int) -> tuple[float, float]:
    return tuple(getattr(config, f"lesion_{key}")[subtype])


def draw_appearance_quantiles(rng: np.random.Generator) -> np.ndarray:
    """One quantile per appearance knob; drawn the same way whatever the subtype."""
    return rng.random(len(APPEARANCE_KEYS))


def lesion_appearance(config, quantiles: np.ndarray, subtype: int) -> dict:
    """Appearance strengths of one lesion: each quantile mapped into its subtype's (low, high) range.

    The ranges overlap between subtypes, so no single value separates them.
    """
    appearance = {}
    for key, quantile in zip(APPEARANCE_KEYS, quantiles):
        low, high = _subtype_range(config, key, subtype)
        appearance[key] = float(low + quantile * (high - low))
    appearance["loculi"] = int(round(appearance["loculi"]))
    return appearance


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def draw_lesion_geometry(config, rng: np.random.Generator, grid: Grid, shape: PancreasShape) -> LesionGeometry:
    """Volume (truncated log-normal), shape, orientation and place of the lesion on the gland."""
    mu, sigma = np.log(config.lesion_volume_median_ml), config.lesion_volume_log_sigma
    low, high = (ndtr((np.log(v) - mu) / sigma) for v in config.lesion_volume_range_ml)
    volume_mm3 = 1000.0 * float(np.exp(mu + sigma * ndtri(rng.uniform(low, high))))
    axes = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)])
    radii = axes * np.cbrt(3 * volume_mm3 / (4 * np.pi) / axes.prod())
    rotation = _random_rotation(rng)
    # The outline of any subtype stays within this normalised radius of the nominal ellipsoid.
    lobulation = max(high for _, high in config.lesion_lobulation)
    irregularity = max(high for _, high in config.lesion_irregularity)
    envelope = 1.05 * (1 + lobulation) * (1 + 2.5 * irregularity)
    position = rng.uniform(0.08, 0.92)
    local_radius = shape.local_radius(position, grid)
    centre = shape.centreline_point(position, grid) + [rng.uniform(-0.4, 0.4) * local_radius,
                                                       rng.uniform(-0.4, 0.4) * local_radius, 0.0]
    reach = envelope * radii.max() + config.lesion_margin_mm + 2 * max(grid.spacing)
    extent = grid.extent
    centre = np.where(2 * reach < extent, np.clip(centre, reach, extent - reach), extent / 2)
    voxels = max(1, int(round(volume_mm3 / float(np.prod(grid.spacing)))))
    return LesionGeometry(centre, radii, rotation, voxels, envelope, position)


def lesion_structure(grid: Grid, geometry: LesionGeometry, margin_mm: float, rng: np.random.Generator,
                     max_loculi: int) -> LesionStructure:
    """Draw the lesion's random structure over a box that holds its envelope plus ``margin_mm``."""
    box = grid.box(geometry.centre, geometry.envelope * geometry.radii.max() + margin_mm + max(grid.spacing))
    offsets = [a - c for a, c in zip(grid.coordinates(box), geometry.centre)]
    box_shape = tuple(s.stop - s.start for s in box)
    local = [np.broadcast_to(sum(geometry.rotation[row, col] * offsets[col] for col in range(3)), box_shape)
             .astype(np.float32) for row in range(3)]
    scaled = [axis / radius for axis, radius in zip(local, geometry.radii)]
    rho_nominal = np.sqrt(sum(s ** 2 for s in scaled))
    direction = [s / np.maximum(rho_nominal, 1e-6) for s in scaled]
    lobe_axes = rng.normal(size=(_LOBES, 3))
    lobe_axes /= np.linalg.norm(lobe_axes, axis=1, keepdims=True)
    frequencies, phases = rng.uniform(1.0, 2.5, _LOBES), rng.uniform(0, 2 * np.pi, _LOBES)
    weights = rng.uniform(0.5, 1.0, _LOBES)
    lobes = sum(w * np.cos(f * np.pi * sum(d * a for d, a in zip(direction, axis)) + p)
                for w, f, p, axis in zip(weights, frequencies, phases, lobe_axes)) / weights.sum()
    roughness = np.clip(smooth_noise(rng, grid, 1.5, box), -2.5, 2.5)
    mottle = smooth_noise(rng, grid, 2.0, box)
    seed_directions = rng.normal(size=(max_loculi, 3))
    seed_directions /= np.linalg.norm(seed_directions, axis=1, keepdims=True)
    seeds = seed_directions * (0.85 * rng.uniform(0, 1, (max_loculi, 1)) ** (1 / 3)) * geometry.radii
    return LesionStructure(box, local, rho_nominal, lobes.astype(np.float32), roughness, mottle, seeds,
                           rng.normal(size=max_loculi))


def lesion_outline(structure: LesionStructure, geometry: LesionGeometry, appearance: dict) -> LesionOutline:
    """Lobulate and roughen the nominal ellipsoid, then keep exactly ``geometry.voxels`` voxels."""
    rho = (structure.rho_nominal / (1 + appearance["lobulation"] * structure.lobes)
           + appearance["irregularity"] * structure.roughness)
    rho = np.where(structure.rho_nominal <= geometry.envelope, rho, _FAR).astype(np.float32)
    count = min(geometry.voxels, int((rho < _FAR).sum()))
    return LesionOutline(rho, float(np.partition(rho.ravel(), count - 1)[count - 1]))


def pancreas_around_lesion(outlines: list[LesionOutline], geometry: LesionGeometry,
                           margin_mm: float) -> np.ndarray:
    """Normalised radius (< 1 inside) of the pancreas tissue around the lesion: ``margin_mm`` around the
    union of the outlines that every subtype would give this lesion, so it does not tell the subtype."""
    mean_radius = float(np.cbrt(geometry.radii.prod()))
    union = np.minimum.reduce([outline.rho / outline.theta for outline in outlines])
    return union / (1 + margin_mm / mean_radius)


def paint_lesion(image: np.ndarray, structure: LesionStructure, outline: LesionOutline,
                 geometry: LesionGeometry, appearance: dict, pancreas_hu: float, config) -> None:
    """Blend the lesion's HU into ``image``: pancreas HU + contrast + mottle + septa + rim, soft-edged."""
    mean_radius = float(np.cbrt(geometry.radii.prod()))
    depth_mm = (outline.theta - outline.rho) * mean_radius  # > 0 inside, about the distance to the outline
    alpha = edge_weight(-depth_mm, 2 * appearance["edge_blur_mm"])
    rim = np.clip(1.0 - depth_mm / config.lesion_rim_width_mm, 0.0, 1.0)
    loculi = max(1, min(appearance["loculi"], len(structure.seeds)))
    septa = np.zeros_like(alpha)
    loculus = np.zeros_like(alpha)
    if loculi >= 2:
        distances = np.stack([np.sqrt(sum((axis - seed[i]) ** 2 for i, axis in enumerate(structure.local)))
                              for seed in structure.seeds[:loculi]])
        nearest_two = np.partition(distances, 1, axis=0)
        septa = np.clip(1.0 - (nearest_two[1] - nearest_two[0]) / (2 * config.lesion_septa_width_mm), 0.0, 1.0)
        loculus = structure.loculus_offsets[:loculi][np.argmin(distances, axis=0)]
    value = (pancreas_hu + appearance["contrast_hu"] + appearance["mottle_hu"] * structure.mottle
             + appearance["septa_hu"] * (septa + 0.3 * loculus) + appearance["rim_hu"] * rim)
    paint(image, structure.box, alpha, value.astype(np.float32))
