"""Deterministic synthetic pancreas CT: the generator's knobs (the presets under conf/synthetic/) and
drawing one case in memory (an ROI crop, a pancreas, a lesion, a subtype).

The subtype shows only in the lesion (texture, septa, rim, margin); everything else (image size,
spacing, anatomy, lesion size and place) is drawn from distributions shared by all subtypes. See
docs/synthetic_data.md. Arrays are (Z, Y, X). :mod:`pancreas_mtl.synthetic.dataset_folder` writes the
cases to disk; a change here that gives other images for the same config bumps its ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.layout import DEFAULT_LABELS
from pancreas_mtl.synthetic.anatomy import (
    HU_MAX,
    HU_MIN,
    Grid,
    draw_pancreas_shape,
    paint_pancreas,
    pancreas_rho,
    render_surroundings,
    smooth_noise,
)
from pancreas_mtl.synthetic.lesion import (
    draw_appearance_quantiles,
    draw_lesion_geometry,
    lesion_appearance,
    lesion_outline,
    lesion_structure,
    paint_lesion,
    pancreas_around_lesion,
)

FLOAT_MASK_PANCREAS = 1.0000153       # the real masks' quirk: label 1 stored as this float
NUM_SUBTYPES = 3
_REFERENCE_VOXEL_MM3 = 0.74 * 0.74 * 2.0  # noise_hu is the noise at the real data's median voxel

Range = tuple[float, float]
PerSubtype = tuple[Range, Range, Range]


@dataclass
class SyntheticConfig:
    """Every knob of the generator; the defaults are the ``default`` preset (conf/synthetic/default.yaml).

    Ranges ``(low, high)`` are sampled uniformly per case. ``lesion_*`` knobs given per subtype hold
    one range per subtype: they are the only values that depend on the subtype.
    """

    name: str = "default"
    seed: int = 0
    train_counts: tuple[int, ...] = (50, 50, 50)        # cases per subtype
    validation_counts: tuple[int, ...] = (10, 10, 10)
    test_counts: tuple[int, ...] = (20, 20, 20)
    float_mask_fraction: float = 0.0                   # masks stored as float32 with pancreas = 1.0000153
    # geometry: field of view in mm and voxel size, per case; shape = fov / spacing
    fov_x_mm: Range = (120.0, 150.0)
    fov_y_mm: Range = (80.0, 96.0)
    fov_z_mm: Range = (96.0, 124.0)
    spacing_xy_mm: Range = (0.8, 1.0)
    spacing_z_mm: Range = (2.0, 2.6)
    # intensities (HU)
    noise_hu: Range = (10.0, 16.0)                    # at a 0.74 x 0.74 x 2 mm voxel; scaled by 1/sqrt(volume)
    fat_hu: Range = (-110.0, -85.0)
    vessel_hu: Range = (150.0, 250.0)
    pancreas_hu: Range = (80.0, 110.0)
    pancreas_texture_hu: Range = (3.0, 8.0)
    pancreas_fat_fraction: Range = (0.0, 0.08)         # fatty clefts in the parenchyma
    pancreas_scale: Range = (0.95, 1.2)                # multiplies the gland's radii
    # lesion geometry, identical for all subtypes
    lesion_volume_median_ml: float = 6.0               # log-normal, truncated to the range
    lesion_volume_log_sigma: float = 0.9
    lesion_volume_range_ml: Range = (1.0, 30.0)
    lesion_margin_mm: float = 2.0                      # pancreas tissue drawn around the lesion's envelope
    lesion_rim_width_mm: float = 2.5
    lesion_septa_width_mm: float = 2.5
    # lesion appearance, one range per subtype (0 cyst-like, 1 septated, 2 solid heterogeneous)
    lesion_contrast_hu: PerSubtype = ((-55.0, -32.0), (-52.0, -28.0), (-34.0, -12.0))
    lesion_mottle_hu: PerSubtype = ((0.0, 4.0), (0.0, 5.0), (10.0, 22.0))
    lesion_septa_hu: PerSubtype = ((0.0, 6.0), (25.0, 60.0), (0.0, 6.0))
    lesion_loculi: PerSubtype = ((2.0, 4.0), (3.0, 6.0), (2.0, 4.0))
    lesion_rim_hu: PerSubtype = ((-6.0, 4.0), (-6.0, 6.0), (10.0, 28.0))
    lesion_lobulation: PerSubtype = ((0.0, 0.12), (0.0, 0.15), (0.12, 0.35))
    lesion_irregularity: PerSubtype = ((0.0, 0.01), (0.0, 0.015), (0.005, 0.03))
    lesion_edge_blur_mm: PerSubtype = ((0.4, 1.0), (0.4, 1.0), (1.0, 2.4))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "SyntheticConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown synthetic-data knob(s) {unknown}; known: {sorted(known)}")
        config = cls(**{key: _as_tuples(value) for key, value in values.items()})
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        """Plain JSON-compatible values (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def validate(self, source: str = "config") -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_counts") and (len(value) != NUM_SUBTYPES or min(value) < 0):
                raise ValueError(f"{source}: {f.name} needs {NUM_SUBTYPES} counts (one per subtype, >= 0), "
                                 f"found {value}")
            if f.type == "PerSubtype" and len(value) != NUM_SUBTYPES:
                raise ValueError(f"{source}: {f.name} needs one (low, high) per subtype, found {value}")
            ranges = value if f.type == "PerSubtype" else [value] if f.type == "Range" else []
            for low_high in ranges:
                if len(low_high) != 2 or low_high[0] > low_high[1]:
                    raise ValueError(f"{source}: {f.name} expects (low, high) with low <= high, found {value}")
        if not 0.0 <= self.float_mask_fraction <= 1.0:
            raise ValueError(f"{source}: float_mask_fraction must be in [0, 1], "
                             f"found {self.float_mask_fraction}")


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_config(name_or_path: str | Path) -> SyntheticConfig:
    """A preset by name (``conf/synthetic/{name}.yaml``: tiny, default, full) or a YAML file by path.

    Knobs a file leaves out keep the ``default`` preset's value.
    """
    from omegaconf import OmegaConf

    presets = config_dir() / "synthetic"
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = presets / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets.glob("*.yaml"))
        raise FileNotFoundError(f"no synthetic-data preset {str(name_or_path)!r}: {path} does not exist "
                                f"(presets: {known})")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    return SyntheticConfig.from_dict(values, source=str(path))


@dataclass
class SyntheticCase:
    """One generated case, in memory.

    Attributes:
        image: (Z, Y, X) int16 HU.
        mask: (Z, Y, X) uint8: 0 background, 1 pancreas, 2 lesion.
        affine: 4x4 voxel (x, y, z) -> RAS mm, diag(-sx, -sy, sz) plus an origin, as the real LPS files.
        subtype: 0, 1 or 2.
        float_mask: store the mask as float32 with pancreas = 1.0000153, like some real masks.
        lesion: the lesion's drawn parameters (volume, contrast, septa, ...), for inspection.
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    subtype: int
    float_mask: bool
    lesion: dict

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in mm."""
        return tuple(float(s) for s in np.abs(np.diag(self.affine)[2::-1]))

    def stored_mask(self) -> np.ndarray:
        """The mask as it goes to disk: uint8, or float32 with the real data's 1.0000153 quirk."""
        if not self.float_mask:
            return self.mask
        return np.where(self.mask == 1, np.float32(FLOAT_MASK_PANCREAS), self.mask.astype(np.float32))


def generate_case(config: SyntheticConfig, rng: np.random.Generator, subtype: int) -> SyntheticCase:
    """One case, no file I/O. Deterministic given ``rng``'s seed.

    ``rng`` is split into independent streams: anatomy and lesion size/place, lesion structure,
    lesion appearance (the only stream whose values depend on ``subtype``) and image noise. The same
    seed with another subtype therefore gives the same anatomy, the same lesion volume and
    position, and the same noise: only the lesion's appearance and outline change.
    """
    if not 0 <= subtype < NUM_SUBTYPES:
        raise ValueError(f"subtype must be in 0..{NUM_SUBTYPES - 1}, found {subtype}")
    anatomy_rng, structure_rng, appearance_rng, noise_rng = rng.spawn(4)
    u = anatomy_rng.uniform
    spacing_xy, spacing_z = u(*config.spacing_xy_mm), u(*config.spacing_z_mm)
    spacing = (spacing_z, spacing_xy, spacing_xy)
    fov = (u(*config.fov_z_mm), u(*config.fov_y_mm), u(*config.fov_x_mm))
    grid = Grid(tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing)), spacing)
    affine = np.diag([-spacing_xy, -spacing_xy, spacing_z, 1.0])
    affine[:3, 3] = [u(-40, 60), u(120, 260), u(-800, -300)]

    shape = draw_pancreas_shape(anatomy_rng, grid, u(*config.pancreas_scale))
    geometry = draw_lesion_geometry(config, anatomy_rng, grid, shape)
    image = render_surroundings(anatomy_rng, grid, shape, u(*config.fat_hu), u(*config.vessel_hu))
    pancreas_hu = u(*config.pancreas_hu)
    texture_hu, fat_fraction = u(*config.pancreas_texture_hu), u(*config.pancreas_fat_fraction)

    structure = lesion_structure(grid, geometry, config.lesion_margin_mm, structure_rng,
                                 int(max(high for _, high in config.lesion_loculi)))
    quantiles = draw_appearance_quantiles(appearance_rng)
    appearances = [lesion_appearance(config, quantiles, k) for k in range(NUM_SUBTYPES)]
    outlines = [lesion_outline(structure, geometry, appearance) for appearance in appearances]
    rho = pancreas_rho(grid, shape, smooth_noise(anatomy_rng, grid, 5.0))
    around_lesion = pancreas_around_lesion(outlines, geometry, config.lesion_margin_mm)
    rho[structure.box] = np.minimum(rho[structure.box], around_lesion)
    pancreas = paint_pancreas(image, grid, anatomy_rng, rho, pancreas_hu, texture_hu, fat_fraction)
    appearance, outline = appearances[subtype], outlines[subtype]
    paint_lesion(image, structure, outline, geometry, appearance, pancreas_hu, config)

    mask = pancreas.astype(np.uint8)
    mask[structure.box][outline.mask] = DEFAULT_LABELS["lesion"]
    float_mask = bool(noise_rng.random() < config.float_mask_fraction)
    voxel_mm3 = float(np.prod(spacing))
    noise_sd = u(*config.noise_hu) * np.sqrt(_REFERENCE_VOXEL_MM3 / voxel_mm3)
    image += _ct_noise(noise_rng, grid.shape, noise_sd)
    image = np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
    lesion = {**appearance, "volume_ml": geometry.voxels * voxel_mm3 / 1000.0, "position": geometry.position}
    return SyntheticCase(image, mask, affine, subtype, float_mask, lesion)


def _ct_noise(rng: np.random.Generator, shape, sd: float) -> np.ndarray:
    """Gaussian noise correlated over about a voxel in-plane, as reconstruction kernels leave it."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0, 0.7, 0.7))
    return noise * np.float32(sd / max(float(noise.std()), 1e-6))
