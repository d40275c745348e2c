"""The synthetic data generator: determinism, layout, presets, and that only the lesion tells the subtype."""

from __future__ import annotations

import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pancreas_mtl.commands.cli import main as cli_main
from pancreas_mtl.raw.io import read_volume
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.synthetic.dataset_folder import GENERATOR_VERSION, MARKER_FILE, generate_dataset, plan_cases
from pancreas_mtl.synthetic.generator import FLOAT_MASK_PANCREAS, SyntheticConfig, generate_case, load_config


@pytest.fixture(scope="module")
def tiny() -> SyntheticConfig:
    return load_config("tiny")


def _case(config, seed, subtype):
    return generate_case(config, np.random.default_rng(seed), subtype)


def test_same_seed_gives_the_same_case_and_another_seed_another(tiny):
    first, again, other = _case(tiny, [3, 1], 1), _case(tiny, [3, 1], 1), _case(tiny, [3, 2], 1)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    np.testing.assert_array_equal(first.affine, again.affine)
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)


def test_case_arrays_and_geometry(tiny):
    case = _case(tiny, [0, 0], 2)
    assert case.image.dtype == np.int16 and case.mask.dtype == np.uint8
    assert case.image.shape == case.mask.shape and case.image.ndim == 3
    assert set(np.unique(case.mask)) == {0, 1, 2}
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")  # as the real LPS files
    spacing_z, spacing_y, spacing_x = case.spacing
    assert spacing_x == spacing_y and tiny.spacing_z_mm[0] <= spacing_z <= tiny.spacing_z_mm[1]
    assert case.image.min() >= -1024 and case.image.max() > 300  # bone and contrast-filled vessels


def _lesion_inside_pancreas(mask: np.ndarray) -> bool:
    """The lesion lies in the gland: pancreas holds most voxels around it and the gland (1 and 2) is one piece.

    The generator keeps 2 mm of pancreas around the lesion; at the tiny preset's 4 mm slices that
    margin is often less than a voxel, so only most (not all) of the ring is pancreas.
    """
    lesion = mask == 2
    ring = ndimage.binary_dilation(lesion) & ~lesion
    _, pieces = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    return bool(np.mean(mask[ring] == 1) > 0.6 and pieces == 1)


def test_subtype_changes_only_the_lesion(tiny):
    """Same seed, other subtype: same anatomy, gland, lesion size and noise; only the lesion differs."""
    cases = [_case(tiny, [8, 4], subtype) for subtype in range(3)]
    whole = [case.mask > 0 for case in cases]
    near_gland = ndimage.binary_dilation(whole[0], iterations=2)
    for case, gland in zip(cases[1:], whole[1:]):
        np.testing.assert_array_equal(gland, whole[0])
        assert (case.mask == 2).sum() == (cases[0].mask == 2).sum()
        changed = case.image != cases[0].image
        assert changed.any() and not (changed & ~near_gland).any()
    assert all(_lesion_inside_pancreas(case.mask) for case in cases)


def test_generate_dataset_writes_the_distributed_layout(tmp_path, tiny):
    root = generate_dataset(tmp_path / "synthetic", tiny, progress=False)
    index = discover(root)
    for split, counts in (("train", tiny.train_counts), ("validation", tiny.validation_counts)):
        cases = index.split(split)
        assert [sum(c.subtype == k for c in cases) for k in range(3)] == list(counts)
        assert all(re.fullmatch(rf"quiz_{c.subtype}_\d{{3}}", c.case_id) for c in cases)
    test_cases = index.split("test")
    assert len(test_cases) == sum(tiny.test_counts)
    assert all(re.fullmatch(r"quiz_\d{3}", c.case_id) and c.label_path is None for c in test_cases)
    subtypes = json.loads((root / "test_labels" / "subtypes.json").read_text())
    assert sorted(subtypes) == sorted(c.case_id for c in test_cases)
    assert [list(subtypes.values()).count(k) for k in range(3)] == list(tiny.test_counts)
    csv = (root / "test_labels" / "subtype_reference.csv").read_text().splitlines()
    assert csv[0] == "Names,Subtype" and len(csv) == 1 + len(test_cases)

    shapes, spacings = set(), set()
    for case in index.labelled + test_cases:
        image = read_volume(case.image_paths[0])
        label_path = case.label_path or root / "test_labels" / f"{case.case_id}.nii.gz"
        mask = np.rint(read_volume(label_path).array).astype(np.uint8)
        assert image.array.dtype == np.int16
        assert set(np.unique(mask)) == {0, 1, 2}, case.case_id
        assert _lesion_inside_pancreas(mask), case.case_id
        np.testing.assert_allclose(read_volume(label_path).affine, image.affine)
        shapes.add(image.shape)
        spacings.add(tuple(round(s, 3) for s in image.spacing))
    assert len(shapes) > 1 and len(spacings) > 1

    # idempotent: a complete dataset of the same config is left alone
    marker = root / MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    generate_dataset(root, tiny, progress=False)
    assert marker.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="seed"):
        generate_dataset(root, dataclasses.replace(tiny, seed=1), progress=False)


def test_files_match_generate_case_and_float_mask_quirk(tmp_path, tiny):
    config = dataclasses.replace(tiny, name="quirk", train_counts=(1, 1, 0), validation_counts=(0, 0, 0),
                                 test_counts=(0, 0, 1), float_mask_fraction=1.0)
    root = generate_dataset(tmp_path / "quirk", config, progress=False)
    planned = plan_cases(config)
    assert len(discover(root).cases) == len(planned) == 3
    for case in planned:
        expected = generate_case(config, np.random.default_rng([config.seed, *case.rng_key]), case.subtype)
        image_path, mask_path = case.relative_paths()
        np.testing.assert_array_equal(read_volume(root / image_path).array, expected.image)
        stored = read_volume(root / mask_path).array
        assert stored.dtype == np.float32 and np.isclose(stored, FLOAT_MASK_PANCREAS).any()
        np.testing.assert_array_equal(np.rint(stored).astype(np.uint8), expected.mask)


def test_a_dataset_of_an_older_generator_version_is_regenerated(tmp_path, tiny):
    config = dataclasses.replace(tiny, name="old", train_counts=(1, 0, 0), validation_counts=(0, 0, 0),
                                 test_counts=(0, 0, 0))
    root = generate_dataset(tmp_path / "old", config, progress=False)
    marker = root / MARKER_FILE
    written = json.loads(marker.read_text())
    (case,) = plan_cases(config)
    image = root / case.relative_paths()[0]
    image.write_bytes(b"an image from an older generator")
    older = {key: value for key, value in written.items() if key != "sha256"}  # older versions kept no digests
    marker.write_text(json.dumps({**older, "generator_version": GENERATOR_VERSION - 1}))

    generate_dataset(root, config, progress=False)

    assert json.loads(marker.read_text()) == written
    expected = generate_case(config, np.random.default_rng([config.seed, *case.rng_key]), case.subtype)
    np.testing.assert_array_equal(read_volume(image).array, expected.image)


def test_command_line_with_a_yaml_file_and_overwrite(tmp_path):
    preset = tmp_path / "mini.yaml"
    preset.write_text("name: mini\ntrain_counts: [1, 1, 1]\nvalidation_counts: [0, 0, 0]\n"
                      "test_counts: [1, 0, 0]\nspacing_xy_mm: [2.0, 2.2]\nspacing_z_mm: [4.0, 4.4]\n")
    root = tmp_path / "mini"
    assert cli_main(["generate", f"size={preset}", f"out={root}", "seed=5"]) == 0
    assert len(discover(root).split("train")) == 3 and len(discover(root).split("test")) == 1
    assert json.loads((root / MARKER_FILE).read_text())["config"]["seed"] == 5
    assert cli_main(["generate", f"size={preset}", f"out={root}", "seed=6", "overwrite=true"]) == 0
    assert json.loads((root / MARKER_FILE).read_text())["config"]["seed"] == 6


def test_presets():
    assert load_config("default") == SyntheticConfig()  # the dataclass defaults are the default preset
    tiny, full = load_config("tiny"), load_config("full")
    assert (tiny.name, full.name) == ("tiny", "full")
    assert full.train_counts == (62, 106, 84) and full.validation_counts == (9, 15, 12)
    assert sum(full.test_counts) == 72
    splits = [case.split for case in plan_cases(full)]
    assert (splits.count("train"), splits.count("validation"), splits.count("test")) == (252, 36, 72)
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_preset")
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig.from_dict({"not_a_knob": 1})


def test_case_names_do_not_tell_the_test_subtype():
    planned = [case for case in plan_cases(load_config("full")) if case.split == "test"]
    assert sorted(int(case.case_id[5:]) for case in planned) == list(range(1, 73))
    in_name_order = [case.subtype for case in sorted(planned, key=lambda case: case.case_id)]
    changes = sum(a != b for a, b in zip(in_name_order, in_name_order[1:]))
    assert changes > 30  # about 46 expected for a random order, 2 if the numbers followed the subtype


def _global_features(case) -> list[float]:
    image = case.image.astype(np.float32)
    voxel_ml = float(np.prod(case.spacing)) / 1000
    return [image.mean(), image.std(), *np.percentile(image, [1, 5, 25, 50, 75, 95, 99]), *case.image.shape,
            *case.spacing[:2], (case.mask > 0).sum() * voxel_ml, (case.mask == 2).sum() * voxel_ml]


def _lesion_features(case) -> list[float]:
    image = case.image.astype(np.float32)
    lesion = case.mask == 2
    reference = np.median(image[case.mask == 1])
    core = ndimage.binary_erosion(lesion)
    shell = lesion & ~core
    core = core if core.sum() >= 5 else lesion
    gradient = np.sqrt(sum(g ** 2 for g in np.gradient(image, *case.spacing)))
    values = image[lesion]
    return [values.mean() - reference, values.std(), np.percentile(values, 10) - reference,
            np.percentile(values, 90) - reference, gradient[core].mean(),
            image[shell].mean() - image[core].mean(), gradient[shell].mean(),
            shell.sum() / lesion.sum() ** (2 / 3)]


def test_only_the_lesion_tells_the_subtype(tiny):
    """A linear classifier on whole-image and size features stays at chance; on lesion features, well above."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    subtypes = np.arange(150) % 3
    cases = [_case(tiny, [2024, i], int(subtype)) for i, subtype in enumerate(subtypes)]
    accuracy = {}
    for name, features in (("global", _global_features), ("lesion", _lesion_features)):
        table = np.array([features(case) for case in cases])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        predicted = cross_val_predict(model, table, subtypes, cv=folds)
        accuracy[name] = balanced_accuracy_score(subtypes, predicted)
    assert accuracy["global"] < 0.5, accuracy
    assert accuracy["lesion"] > 0.7, accuracy
