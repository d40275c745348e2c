"""Geometry and intensities of one synthetic CT ROI: fat, distractor organs, vessels, pancreas, lesion.

Everything is placed in millimetres on a ``Grid``; arrays are (Z, Y, X) as everywhere in the project.
Voxel axes follow the real (LPS) files: x grows towards the patient's left, y towards posterior, z
towards superior, so the pancreatic head sits at low x and low z, the tail at high x and high z, the
spine and aorta at high y. ``pancreas_mtl.synthetic.generator`` draws the parameters and assembles a case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (Z, Y, X), ``spacing`` (z, y, x) mm; voxel centres at (i + 0.5) * spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def extent(self) -> np.ndarray:
        """Field of view (z, y, x) in mm."""
        return np.asarray(self.shape) * np.asarray(self.spacing)

    def box(self, centre, radius) -> tuple[slice, slice, slice]:
        """Index slices of the voxels within ``radius`` (z, y, x) mm of ``centre``, clipped to the grid."""
        slices = []
        for c, r, s, n in zip(centre, np.broadcast_to(radius, 3), self.spacing, self.shape):
            low = int(np.clip(np.floor((c - r) / s), 0, n))
            high = int(np.clip(np.ceil((c + r) / s) + 1, low, n))
            slices.append(slice(low, high))
        return tuple(slices)

    def coordinates(self, box=None):
        """Voxel-centre coordinates in mm as broadcastable (z (n,1,1), y (1,n,1), x (1,1,n))."""
        box = box or (slice(None),) * 3
        axes = [(np.arange(n, dtype=np.float32)[b] + 0.5) * s for n, b, s in zip(self.shape, box, self.spacing)]
        return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def smooth_noise(rng: np.random.Generator, grid: Grid, scale_mm: float, box=None) -> np.ndarray:
    """Gaussian random field (float32, about unit std) with correlation length ``scale_mm``, on ``box``.

    White noise on a coarse lattice of knots, spread by separable Gaussian kernels: three small matrix
    products instead of a full-resolution filter.
    """
    weights = []
    for coordinate, spacing in zip(grid.coordinates(box), grid.spacing):
        coordinate = coordinate.ravel()
        # Knots no denser than the voxels: finer detail than a voxel would not show anyway.
        step = max(0.7 * scale_mm, spacing)
        knots = np.arange(coordinate.min() - 2 * step, coordinate.max() + 2 * step, step)
        weights.append(np.exp(-0.5 * ((coordinate[:, None] - knots[None, :]) / (0.85 * step)) ** 2,
                              dtype=np.float32))
    field = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
    # einsum rather than tensordot: BLAS threads crawl when the cores are shared with other work.
    field = np.einsum("abc,xc->abx", field, weights[2])   # (kz, ky, X)
    field = np.einsum("abx,yb->ayx", field, weights[1])   # (kz, Y, X)
    field = np.einsum("ayx,za->zyx", field, weights[0])   # (Z, Y, X)
    std = float(field.std())
    return field / std if std > 0 else field


def paint(image: np.ndarray, box, weight: np.ndarray, value) -> None:
    """Blend ``value`` into ``image[box]`` with per-voxel ``weight`` in [0, 1] (partial volume)."""
    region = image[box]
    region += weight * (np.asarray(value, dtype=np.float32) - region)


def edge_weight(signed_distance_mm: np.ndarray, edge_mm: float = 0.8) -> np.ndarray:
    """1 inside, 0 outside, a linear ramp ``edge_mm`` wide across the surface (signed distance < 0 inside)."""
    return np.clip(0.5 - signed_distance_mm / edge_mm, 0.0, 1.0).astype(np.float32)


def ellipsoid_rho(grid: Grid, centre, radii, box=None, rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised radius of an ellipsoid (< 1 inside); ``centre`` and ``radii`` (z, y, x) in mm."""
    z, y, x = grid.coordinates(box)
    offsets = (z - centre[0], y - centre[1], x - centre[2])
    if rotation is not None:
        offsets = tuple(sum(rotation[row, col] * offsets[col] for col in range(3)) for row in range(3))
    return np.sqrt(sum((o / r) ** 2 for o, r in zip(offsets, radii))).astype(np.float32)


def paint_ellipsoid(image, grid, rng, centre, radii, hu, texture_hu=0.0, rotation=None, vessel_hu=None) -> None:
    """A solid organ; with ``vessel_hu``, a network of 2-3 mm vessels runs through it (liver, spleen)."""
    box = grid.box(centre, max(radii) + 2.0)
    if any(s.stop <= s.start for s in box):
        return
    rho = ellipsoid_rho(grid, centre, radii, box, rotation)
    value = hu + texture_hu * smooth_noise(rng, grid, 6.0, box) if texture_hu else hu
    if vessel_hu is not None:
        # Where two smooth fields both cross zero: curved tubes, a cheap stand-in for a vessel tree.
        tubes = np.sqrt(smooth_noise(rng, grid, 10.0, box) ** 2 + smooth_noise(rng, grid, 10.0, box) ** 2)
        value = value + (vessel_hu - hu) * np.clip(1.5 - tubes / 0.3, 0.0, 1.0)
    paint(image, box, edge_weight((rho - 1.0) * min(radii)), value)


def polyline_distance(grid: Grid, points: np.ndarray, reach_mm: float):
    """(box, distance in mm to the polyline ``points`` (N, 3) z, y, x mm) over the box within ``reach_mm``."""
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    dense = max(2, int(np.ceil(steps.sum() / max(0.3 * reach_mm, 1.0))))
    along = np.concatenate([[0.0], np.cumsum(steps)])
    samples = np.stack([np.interp(np.linspace(0, along[-1], dense), along, points[:, a]) for a in range(3)], 1)
    low, high = samples.min(0) - reach_mm, samples.max(0) + reach_mm
    box = grid.box((low + high) / 2, (high - low) / 2)
    z, y, x = grid.coordinates(box)
    distance2 = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
    for pz, py, px in samples:
        np.minimum(distance2, (z - pz) ** 2 + (y - py) ** 2 + (x - px) ** 2, out=distance2)
    return box, np.sqrt(distance2)


def paint_hollow_tube(image, grid, rng, points, radius, wall_mm, wall_hu, content_hu, air_fraction=0.0) -> None:
    """Bowel: an enhancing wall around fluid; gas rises to the anterior (low y) side if ``air_fraction``."""
    box, distance = polyline_distance(grid, points, radius + 2.0)
    if distance.size == 0:
        return
    paint(image, box, edge_weight(distance - radius), wall_hu)
    lumen = edge_weight(distance - (radius - wall_mm))
    paint(image, box, lumen, content_hu + 6.0 * smooth_noise(rng, grid, 3.0, box))
    if air_fraction > 0:
        _, y, _ = grid.coordinates(box)
        lumen_y = np.broadcast_to(y, distance.shape)[lumen > 0.5]
        level = np.quantile(lumen_y, air_fraction) if lumen_y.size else -1.0
        paint(image, box, lumen * edge_weight(y - level, 1.0), -900.0)


def paint_vertical_tube(image, grid, centre_yx, slope_yx, radii_yx, hu, z_range=None) -> None:
    """A vessel running along z: centre (y, x) at the middle slice, drifting by ``slope_yx`` mm per mm."""
    z, y, x = grid.coordinates()
    z_mid = grid.extent[0] / 2
    rho = np.sqrt(((y - centre_yx[0] - slope_yx[0] * (z - z_mid)) / radii_yx[0]) ** 2
                  + ((x - centre_yx[1] - slope_yx[1] * (z - z_mid)) / radii_yx[1]) ** 2)
    weight = edge_weight((rho - 1.0) * min(radii_yx))
    if z_range is not None:
        weight = weight * edge_weight(np.abs(z - sum(z_range) / 2) - (z_range[1] - z_range[0]) / 2, 2.0)
    paint(image, (slice(None),) * 3, weight, hu)


def paint_spine(image, grid, centre_yx, radius, cancellous_hu, cortex_hu, disc_period, disc_hu, phase) -> None:
    """A vertebral column: cortical rim, cancellous core, intervertebral discs every ``disc_period`` mm."""
    z, y, x = grid.coordinates()
    radial = np.sqrt((y - centre_yx[0]) ** 2 + ((x - centre_yx[1]) / 1.15) ** 2)
    disc = edge_weight(np.abs(((z + phase) % disc_period) - disc_period / 2) - 3.5, 1.5)
    body = edge_weight(radial - radius)
    paint(image, (slice(None),) * 3, body, cortex_hu)
    paint(image, (slice(None),) * 3, edge_weight(radial - radius + 2.0) * (1 - disc), cancellous_hu)
    paint(image, (slice(None),) * 3, body * disc, disc_hu)


@dataclass
class PancreasShape:
    """A curved tube along x, from head (low x) to tail; 1D profiles are sampled at the grid's x centres."""

    x_head: float
    x_tail: float
    centre_y: np.ndarray   # (X,) mm
    centre_z: np.ndarray   # (X,) mm
    radius_y: np.ndarray   # (X,) mm, antero-posterior half thickness
    radius_z: np.ndarray   # (X,) mm, cranio-caudal half height
    head_centre: np.ndarray  # (z, y, x) mm: the bulky head and uncinate process
    head_radii: np.ndarray   # (z, y, x) mm

    def centreline_point(self, s: float, grid: Grid) -> np.ndarray:
        """(z, y, x) mm of the centreline at fraction ``s`` of the way from head to tail."""
        x = self.x_head + s * (self.x_tail - self.x_head)
        xs = grid.coordinates()[2].ravel()
        return np.array([np.interp(x, xs, self.centre_z), np.interp(x, xs, self.centre_y), x])

    def local_radius(self, s: float, grid: Grid) -> float:
        x = self.x_head + s * (self.x_tail - self.x_head)
        xs = grid.coordinates()[2].ravel()
        return float(min(np.interp(x, xs, self.radius_y), np.interp(x, xs, self.radius_z)))


def draw_pancreas_shape(rng: np.random.Generator, grid: Grid, scale: float) -> PancreasShape:
    extent_z, extent_y, extent_x = grid.extent
    x = grid.coordinates()[2].ravel().astype(np.float64)
    x_head, x_tail = rng.uniform(0.08, 0.16) * extent_x, rng.uniform(0.84, 0.92) * extent_x
    s = (x - x_head) / (x_tail - x_head)
    sc = np.clip(s, 0.0, 1.0)
    z_head, z_tail = rng.uniform(0.30, 0.42) * extent_z, rng.uniform(0.55, 0.70) * extent_z
    centre_z = z_head + (z_tail - z_head) * (3 * sc ** 2 - 2 * sc ** 3)
    for _ in range(2):
        amplitude, frequency, phase = rng.uniform(0, 4), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
        centre_z += amplitude * np.sin(2 * np.pi * frequency * sc + phase)
    centre_y = (rng.uniform(0.44, 0.54) * extent_y - rng.uniform(0.06, 0.14) * extent_y * np.sin(np.pi * sc)
                + rng.uniform(0.0, 0.12) * extent_y * (sc - 0.5))
    knots = [0.0, 0.25, 0.45, 0.7, 1.0]
    radius = np.interp(sc, knots, [rng.uniform(12, 15), rng.uniform(8, 10.5), rng.uniform(9.5, 12),
                                   rng.uniform(9, 11.5), rng.uniform(7, 9.5)]) * scale
    radius *= 1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * sc + rng.uniform(0, 2 * np.pi))
    # Perpendicular half widths shrink where the path climbs steeply: divide the offsets by the slope.
    radius_y = radius * rng.uniform(0.72, 0.9) * np.sqrt(1 + np.gradient(centre_y, x) ** 2)
    radius_z = radius * rng.uniform(1.0, 1.2) * np.sqrt(1 + np.gradient(centre_z, x) ** 2)
    head_radius = radius[np.argmin(np.abs(s))]
    head_centre = np.array([z_head - rng.uniform(0.2, 0.6) * head_radius,
                            centre_y[np.argmin(np.abs(s))] + rng.uniform(-2, 4), x_head + 0.5 * head_radius])
    head_radii = head_radius * np.array([rng.uniform(1.1, 1.4), rng.uniform(0.75, 0.95), rng.uniform(0.9, 1.2)])
    return PancreasShape(x_head, x_tail, centre_y, centre_z, radius_y, radius_z, head_centre, head_radii)


def pancreas_rho(grid: Grid, shape: PancreasShape, lobulation: np.ndarray) -> np.ndarray:
    """Normalised distance to the pancreas surface (< 1 inside), tube and head united, contour lobulated."""
    z, y, x = grid.coordinates()
    tube = np.sqrt(((y - shape.centre_y[None, None, :]) / shape.radius_y) ** 2
                   + ((z - shape.centre_z[None, None, :]) / shape.radius_z) ** 2
                   + (np.maximum(0, x - shape.x_tail) / shape.radius_y[-1]) ** 2)
    head = ellipsoid_rho(grid, shape.head_centre, shape.head_radii)
    tube = np.where(x < shape.x_head, np.inf, tube)  # the head ellipsoid caps the tube's start
    return np.minimum(tube, head) + 0.06 * lobulation


def _smooth_path(rng, start, step_mm, steps, bounds_low, bounds_high) -> np.ndarray:
    """A random walk with momentum, kept inside [bounds_low, bounds_high] (z, y, x mm): a bowel loop."""
    points = [np.asarray(start, dtype=np.float64)]
    direction = rng.normal(size=3)
    for _ in range(steps):
        direction = 0.6 * direction / np.linalg.norm(direction) + 0.4 * rng.normal(size=3)
        step = step_mm * direction / np.linalg.norm(direction)
        points.append(np.clip(points[-1] + step, bounds_low, bounds_high))
    return np.array(points)


def render_surroundings(rng: np.random.Generator, grid: Grid, shape: PancreasShape, fat_hu: float,
                        vessel_hu: float) -> np.ndarray:
    """Everything but the pancreas, float32 HU (Z, Y, X): fat, liver, spleen, kidneys, stomach, duodenum,
    bowel, spine and vessels. Each organ is drawn with a probability, placed where it lies in a real ROI."""
    ez, ey, ex = grid.extent
    u = rng.uniform
    image = np.float32(fat_hu) + 8.0 * smooth_noise(rng, grid, 12.0)
    if u() < 0.8:  # liver: patient's right, anterior and superior, mostly outside the crop
        paint_ellipsoid(image, grid, rng, (ez * u(0.8, 1.1), ey * u(0.2, 0.45), -ex * u(0.15, 0.35)),
                        (u(60, 80), u(50, 70), u(55, 75)), u(100, 130), texture_hu=5.0,
                        vessel_hu=vessel_hu * u(0.6, 0.9))
    if u() < 0.6:  # spleen: patient's left, posterior and superior
        paint_ellipsoid(image, grid, rng, (ez * u(0.85, 1.1), ey * u(0.6, 0.85), ex * u(1.05, 1.2)),
                        (u(40, 55), u(25, 32), u(28, 38)), u(110, 140), texture_hu=6.0,
                        vessel_hu=vessel_hu * u(0.6, 0.9))
    for side in (u(-0.1, 0.08), u(0.92, 1.1)):  # kidneys: enhancing cortex around the medulla
        centre = (ez * u(0.2, 0.5), ey * u(0.85, 1.05), ex * side)
        radii = np.array([u(45, 55), u(22, 28), u(25, 32)])
        if u() < 0.6:
            paint_ellipsoid(image, grid, rng, centre, radii, u(150, 200))
            paint_ellipsoid(image, grid, rng, centre, radii * 0.6, u(80, 120))
    if u() < 0.7:  # stomach: anterior, left, superior; gas floats anteriorly (low y) in a supine patient
        start = np.array([ez * u(0.75, 1.0), ey * u(0.08, 0.2), ex * u(0.55, 0.75)])
        paint_hollow_tube(image, grid, rng, np.array([start, start + [u(-10, 10), u(-5, 5), u(20, 35)]]),
                          u(18, 28), 3.0, u(40, 70), u(0, 30), air_fraction=u(0, 0.4))
    # duodenum: a C around the pancreatic head, open towards the patient's left
    head, head_radii = shape.head_centre, shape.head_radii
    duodenum_radius = u(8, 11)
    bend = max(head_radii[0], head_radii[2]) + duodenum_radius + u(0, 3)
    angles = np.linspace(-0.55 * np.pi, 0.55 * np.pi, 12)
    c_loop = np.stack([head[0] + bend * np.sin(angles), head[1] + u(-3, 3) + 3 * np.cos(angles),
                       head[2] - bend * np.cos(angles)], axis=1)
    bulb, third_part = c_loop[:1] + [-5, u(0, 8), u(25, 45)], c_loop[-1:] + [5, u(-15, -5), u(15, 30)]
    c_loop = np.vstack([bulb, c_loop, third_part])
    paint_hollow_tube(image, grid, rng, c_loop, duodenum_radius, 2.5, u(40, 70), u(0, 30),
                      air_fraction=u(0, 0.3) if u() < 0.3 else 0.0)
    for _ in range(rng.integers(2, 5)):  # small bowel loops, anterior and inferior
        low, high = np.array([0.0, 0.0, 0.0]), np.array([0.55 * ez, 0.3 * ey, ex])
        path = _smooth_path(rng, u(low, high), u(12, 20), 6, low, high)
        content, air = [(u(0, 30), 0.0), (u(-80, 20), 0.0), (u(0, 30), u(0.2, 0.6))][rng.integers(3)]
        paint_hollow_tube(image, grid, rng, path, u(7, 12), 2.0, u(35, 65), content, air_fraction=air)
    paint_spine(image, grid, (ey + u(-2, 12), ex * u(0.42, 0.55)), u(18, 24), u(150, 260), u(450, 750),
                u(28, 34), u(70, 95), u(0, 40))
    paint_vertical_tube(image, grid, (ey * u(0.78, 0.88), ex * u(0.52, 0.62)), rng.normal(0, 0.05, 2),
                        (u(9, 12),) * 2, vessel_hu)  # aorta
    paint_vertical_tube(image, grid, (ey * u(0.74, 0.84), ex * u(0.28, 0.38)), rng.normal(0, 0.05, 2),
                        (u(6, 9), u(9, 13)), vessel_hu * u(0.6, 0.9))  # inferior vena cava
    neck = shape.centreline_point(0.3, grid)
    behind_neck = neck[1] + shape.local_radius(0.3, grid) * 0.9
    paint_vertical_tube(image, grid, (behind_neck + u(8, 12), neck[2] + u(0, 6)), rng.normal(0, 0.05, 2),
                        (u(3, 4.5),) * 2, vessel_hu)  # superior mesenteric artery
    paint_vertical_tube(image, grid, (behind_neck + u(2, 5), neck[2] - u(6, 12)), rng.normal(0, 0.05, 2),
                        (u(4, 6),) * 2, vessel_hu * u(0.8, 1.0), z_range=(0, neck[0]))  # sup. mesenteric vein
    # splenic vein: along the back of the pancreatic body and tail
    vein_radius = u(3, 4.5)
    along = [shape.centreline_point(s, grid) for s in np.linspace(0.3, 1.05, 10)]
    gap = u(0.5, 2.0) + vein_radius
    x_centres = grid.coordinates()[2].ravel()
    path = np.array([p + [0, np.interp(p[2], x_centres, shape.radius_y) + gap, 0] for p in along])
    box, distance = polyline_distance(grid, path, vein_radius + 2)
    paint(image, box, edge_weight(distance - vein_radius), vessel_hu * u(0.8, 1.0))
    for _ in range(rng.integers(1, 4)):  # small arteries crossing the fat
        path = _smooth_path(rng, u(0, 1, 3) * grid.extent, u(15, 25), 4, np.zeros(3), grid.extent)
        radius = u(1.2, 2.2)
        box, distance = polyline_distance(grid, path, radius + 2)
        paint(image, box, edge_weight(distance - radius, 1.0), vessel_hu * u(0.7, 1.0))
    return image


def paint_pancreas(image, grid, rng, rho, base_hu, texture_hu, fat_fraction) -> np.ndarray:
    """Textured parenchyma with fatty clefts where ``rho`` < 1; returns the hard pancreas region (bool)."""
    box = ndimage.find_objects((rho < 1.2).astype(np.uint8))[0]  # texture only where the gland is
    weight = edge_weight((rho[box] - 1.0) * 8.0)
    clefts = smooth_noise(rng, grid, 2.0, box)
    threshold = float(ndtri(1.0 - fat_fraction)) if fat_fraction > 0 else np.inf  # the field is about N(0, 1)
    value = (base_hu + texture_hu * smooth_noise(rng, grid, 2.5, box)
             - 60.0 * np.clip((clefts - threshold) / 0.5, 0.0, 1.0))
    paint(image, box, weight, value)
    return rho < 1.0
