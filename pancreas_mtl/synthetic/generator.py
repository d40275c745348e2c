"""Deterministic synthetic pancreas CT in the distributed layout: ROI crops, a pancreas, a lesion, a subtype.

The subtype shows only in the lesion (texture, septa, rim, margin); everything else (image size,
spacing, anatomy, lesion size and place) is drawn from distributions shared by all subtypes. See
docs/synthetic_data.md. Arrays are (Z, Y, X); files are written with ``write_nifti`` (x, y, z on disk).

    pancreas-mtl generate size=default out=outputs/data/synthetic_default
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pancreas_mtl.config import config_dir
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.raw.layout import DEFAULT_LABELS, image_file_name
from pancreas_mtl.files import atomic_path
from pancreas_mtl.output_guard import (
    changed_files,
    describe_paths,
    file_digests,
    foreign_entries,
    listed_files,
    read_manifest,
    remove_listed,
    write_manifest,
)
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

GENERATOR_VERSION = 4  # bump whenever the same config would give other images, or a preset changes
# (4: the default preset's test split grew from 12 to 60 cases; a stale set is regenerated, listed files only)
MARKER_FILE = "synthetic.json"        # the manifest: version, config, files; "complete" set last
TEST_LABELS_DIR = "test_labels"       # test masks and subtypes, out of discovery's way
FLOAT_MASK_PANCREAS = 1.0000153       # the real masks' quirk: label 1 stored as this float
NUM_SUBTYPES = 3
log = logging.getLogger(__name__)
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
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


@dataclass(frozen=True)
class PlannedCase:
    """Name, split and subtype of one case, and the key of its random stream (independent of other cases)."""

    case_id: str
    split: str
    subtype: int
    rng_key: tuple[int, ...]

    def relative_paths(self) -> tuple[str, str]:
        """(image, mask) paths under the dataset root; test masks go to test_labels/."""
        if self.split == "test":
            return f"test/{image_file_name(self.case_id)}", f"{TEST_LABELS_DIR}/{self.case_id}.nii.gz"
        folder = f"{self.split}/subtype{self.subtype}"
        return f"{folder}/{image_file_name(self.case_id)}", f"{folder}/{self.case_id}.nii.gz"


def plan_cases(config: SyntheticConfig) -> list[PlannedCase]:
    """Every case of the dataset. Numbers are shuffled so that neither a name's number nor the
    order of test cases tells the subtype; train and validation share each subtype's numbers."""
    naming = np.random.default_rng([config.seed, 1_000_003])
    cases = []
    for subtype in range(NUM_SUBTYPES):
        n_train, n_val = config.train_counts[subtype], config.validation_counts[subtype]
        numbers = naming.permutation(n_train + n_val) + 1
        for split, chosen in (("train", numbers[:n_train]), ("validation", numbers[n_train:])):
            key = _SPLIT_CODES[split]
            cases += [PlannedCase(f"quiz_{subtype}_{n:03d}", split, subtype, (key, subtype, int(n)))
                      for n in sorted(chosen)]
    test_subtypes = np.repeat(np.arange(NUM_SUBTYPES), config.test_counts)
    numbers = naming.permutation(len(test_subtypes)) + 1
    cases += [PlannedCase(f"quiz_{n:03d}", "test", int(s), (_SPLIT_CODES["test"], int(n)))
              for n, s in sorted(zip(numbers, test_subtypes))]
    return cases


def _write_case(root: Path, config: SyntheticConfig, planned: PlannedCase) -> None:
    case = generate_case(config, np.random.default_rng([config.seed, *planned.rng_key]), planned.subtype)
    image_path, mask_path = planned.relative_paths()
    write_nifti(case.image, case.affine, root / image_path)
    write_nifti(case.stored_mask(), case.affine, root / mask_path)


def _marker(config: SyntheticConfig) -> dict:
    return {"generator_version": GENERATOR_VERSION, "config": config.to_dict()}


def planned_files(config: SyntheticConfig) -> list[str]:
    """Every file ``generate_dataset`` writes for ``config`` (relative paths), but the marker."""
    files = [path for case in plan_cases(config) for path in case.relative_paths()]
    return sorted([*files, f"{TEST_LABELS_DIR}/subtypes.json", f"{TEST_LABELS_DIR}/subtype_reference.csv"])


def _files_of(found: dict) -> list[str] | None:
    """What a marker says its generator wrote. A marker of the format before file lists (written
    last, by version 3 and earlier) names its config, and the config names the files."""
    files = listed_files(found)
    if files is not None or "files" in found:
        return files
    try:
        return planned_files(SyntheticConfig.from_dict(found.get("config") or {}, source=MARKER_FILE))
    except (TypeError, ValueError):
        return None  # a config this code cannot read: nothing can be told to be the generator's


def _state(root: Path) -> tuple[dict | None, list[str] | None, list[str]]:
    """(marker, the files it lists, the entries it does not list). A concurrent run writes its marker
    before its first file: when the marker changed during the scan, the scan is repeated."""
    marker_path = root / MARKER_FILE
    for _ in range(5):
        found = read_manifest(marker_path)
        listed = _files_of(found) if found is not None else None
        foreign = foreign_entries(root, listed or [], MARKER_FILE)
        if read_manifest(marker_path) == found:
            break
    return found, listed, foreign


def _refuse_foreign(root: Path, foreign: list[str], listed: bool) -> None:
    if not foreign:
        return
    why = (f"not listed in its {MARKER_FILE}" if listed
           else f"the folder has no {MARKER_FILE}, the generator's list of the files it wrote")
    raise FileExistsError(
        f"{root}: holds {len(foreign)} file(s) or folder(s) the synthetic-data generator did not write "
        f"({why}): {describe_paths(foreign)}. The generator writes only into an empty folder or one it "
        "generated, and never removes what it did not write, with or without overwrite: "
        "choose another folder, or move those files out.")


def generate_dataset(root: str | Path, config: SyntheticConfig, *, overwrite: bool = False,
                     progress: bool = True, workers: int = 0) -> Path:
    """Write the dataset under ``root`` in the distributed layout; returns ``root``.

    ``synthetic.json`` is the generator's manifest: its version, the config and every file it
    writes, saved (atomically) before the first case as incomplete and marked complete after the
    last, so a killed run still knows what it may have left. Idempotent: a complete dataset of
    the same config is left as it is; an incomplete one is completed. Parallel-safe: concurrent
    calls with the same config write identical files atomically. Each case comes from its own
    seeded stream, so the files do not depend on ``workers``. Test masks go to
    ``test_labels/{case}.nii.gz``, test subtypes to ``test_labels/subtypes.json`` and
    ``test_labels/subtype_reference.csv`` (the ``Names,Subtype`` format a prediction run writes).

    Replacing (``overwrite=True``, or a dataset an older generator version wrote, which is
    regenerated with a warning) removes the files the manifest lists and the folders they leave
    empty, nothing else.

    Raises:
        FileExistsError: ``root`` holds anything the manifest does not list, or is not empty and has
            no manifest (a dataset of one's own): flag or not, nothing is written or removed. Or
            ``root`` holds a dataset of another config and ``overwrite`` is False.
    """
    from pancreas_mtl.devices import map_with_progress

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: is a file, not a folder to generate the synthetic dataset into")
    marker_path, expected = root / MARKER_FILE, _marker(config)
    planned, files = plan_cases(config), planned_files(config)
    found, listed, foreign = _state(root)
    same = found is not None and all(found.get(key) == value for key, value in expected.items())
    if same and found.get("complete", "files" not in found) and not overwrite:
        if "files" not in found and listed is not None:  # a pre-manifest marker: add the list, keep the files
            write_manifest(marker_path, {**expected, "complete": True, "files": listed})
        return root
    _refuse_foreign(root, foreign, listed is not None)
    changed = changed_files(root, found.get("sha256") if found else None)
    if changed:
        raise FileExistsError(f"{root}: {describe_paths(changed)} changed after the generator wrote them (edited "
                              "by hand?): they are the user's and never replaced, with or without overwrite: move "
                              "them out, or choose another folder.")
    stale = found is not None and found.get("generator_version", 0) < GENERATOR_VERSION
    if found is not None and not same and not stale and not overwrite:
        found_config = found.get("config", {})
        differing = sorted(k for k, v in expected["config"].items() if found_config.get(k) != v)
        raise FileExistsError(f"{root}: holds a synthetic dataset of another configuration (differs in "
                              f"{differing or ['generator_version']}); pass overwrite=True (overwrite=true on "
                              "the command line) "
                              f"to replace it (only the files its {MARKER_FILE} lists are removed)")
    if stale and not overwrite:
        log.warning("%s: synthetic dataset of generator version %s, this is version %s; regenerating it",
                    root, found.get("generator_version"), GENERATOR_VERSION)
    remove = [] if listed is None else listed if (overwrite or not same) else sorted(set(listed) - set(files))
    if remove:
        # list old and new files first: a run killed while removing still knows both
        write_manifest(marker_path, {**expected, "complete": False, "files": sorted({*listed, *files})})
        remove_listed(root, remove, MARKER_FILE)
    write_manifest(marker_path, {**expected, "complete": False, "files": files})
    map_with_progress(_write_case, [(root, config, case) for case in planned], num_workers=workers,
                      desc=f"synthetic {config.name}", progress=progress)
    test = [case for case in planned if case.split == "test"]
    with atomic_path(root / TEST_LABELS_DIR / "subtypes.json") as tmp:
        tmp.write_text(json.dumps({c.case_id: c.subtype for c in test}, indent=1))
    with atomic_path(root / TEST_LABELS_DIR / "subtype_reference.csv") as tmp:
        tmp.write_text("Names,Subtype\n" + "".join(f"{c.case_id}.nii.gz,{c.subtype}\n" for c in test))
    write_manifest(marker_path, {**expected, "complete": True, "files": files, "sha256": file_digests(root, files)})
    return root
