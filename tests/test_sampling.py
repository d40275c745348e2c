"""Patch sampler, dataset and data module: foreground oversampling, subtype balancing, shapes, padding,
seeding, mmap reads, the data.sampling settings and a MONAI transform from the config in the batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.dataset import settings
from pancreas_mtl.dataset.augmentation import augmentation_region_size, build_augmentation
from pancreas_mtl.dataset.cached_case import CachedCase
from pancreas_mtl.dataset.datamodule import PancreasDataModule
from pancreas_mtl.dataset.prepare import PreparedDataset
from pancreas_mtl.dataset.sampling import PatchDataset, PatchSampler, collate_patches, read_region
from pancreas_mtl.dataset.settings import sampling_settings
from tests.test_augmentation import compose_augmentation

PATCH = (8, 16, 16)
CONF = Path(__file__).resolve().parents[1] / "conf"
# What each test states unless it says otherwise (nnU-Net's rate; no lesion centring; cases uniformly).
SAMPLING = {"oversample_foreground": 1 / 3, "lesion_centred_probability": 0.0, "subtype_balanced": False}


def make_sampler(cases, patch=PATCH, region_size=None, **sampling) -> PatchSampler:
    return PatchSampler(cases, patch, region_size, **{**SAMPLING, **sampling})


def write_case(folder: Path, case_id: str, shape=(24, 40, 40), subtype: int | None = 0,
               pancreas_box=((10, 14), (18, 24), (18, 24)), lesion_box=((11, 13), (20, 22), (20, 22)),
               has_label: bool = True) -> CachedCase:
    """A cache entry as the preprocessor writes it: image = voxel index (so crops can be located), boxes of
    pancreas (1) and lesion (2), every foreground voxel listed in the foreground locations."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    np.save(folder / f"{case_id}_image.npy", image)
    seg = np.zeros(shape, dtype=np.int8)
    for label, box in ((1, pancreas_box), (2, lesion_box)):
        if box is not None:
            seg[tuple(slice(a, b) for a, b in box)] = label
    if has_label:
        np.save(folder / f"{case_id}_seg.npy", seg)
        locations = np.concatenate([np.concatenate([np.full((n.shape[0], 1), label), n], axis=1)
                                    for label in (1, 2) if len(n := np.argwhere(seg == label))] or
                                   [np.zeros((0, 4), dtype=int)])
        np.save(folder / f"{case_id}_fg.npy", locations.astype(np.int32))
    properties = {"case_id": case_id, "subtype": subtype, "shape_after_preprocessing": list(shape),
                  "has_label": has_label}
    (folder / f"{case_id}.json").write_text(json.dumps(properties))
    return CachedCase.from_properties(folder, properties)


def patch_of(sampler: PatchSampler, region: np.ndarray) -> np.ndarray:
    """The patch inside a sampled region (the sampler centres the patch in it)."""
    m = sampler.region_margin
    p = sampler.patch_size
    return region[..., m[0]:m[0] + p[0], m[1]:m[1] + p[1], m[2]:m[2] + p[2]]


def test_read_region_pads_outside_and_copies_inside():
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    region = read_region(array, (-1, 2, 3), (3, 4, 4))
    assert region.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(region[0, 0], 0)
    np.testing.assert_array_equal(region[0, 1:, :3, :3], array[0, :2, 2:5, 3:6])
    np.testing.assert_array_equal(region[0, :, 3:, :], 0)
    assert read_region(array, (10, 10, 10), (2, 2, 2)).sum() == 0


@pytest.mark.parametrize("shape", [(24, 40, 40), (5, 40, 40), (5, 9, 11), (8, 16, 16)])
@pytest.mark.parametrize("region", [None, (12, 22, 20)])
def test_regions_and_patches_have_the_requested_size(tmp_path, shape, region):
    case = write_case(tmp_path, "c0", shape=shape, pancreas_box=((1, 3), (2, 5), (2, 5)),
                      lesion_box=((2, 3), (3, 4), (3, 4)))
    sampler = make_sampler([case], PATCH, region_size=region, oversample_foreground=0.5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = sampler.sample(rng)
        assert drawn["image"].shape == (1, *sampler.region_size) and drawn["image"].dtype == np.float32
        assert drawn["seg"].shape == sampler.region_size and drawn["seg"].dtype == np.int8
    transform = build_augmentation({"spatial": {"enabled": False}}, PATCH)
    dataset = PatchDataset(sampler, transform, samples_per_epoch=5, seed=0)
    for item in dataset:
        assert item["image"].shape == (1, *PATCH) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, *PATCH) and item["label"].dtype == torch.uint8


def test_volume_smaller_than_patch_is_centred_and_padded(tmp_path):
    shape = (5, 9, 16)
    case = write_case(tmp_path, "small", shape=shape, pancreas_box=((0, 5), (0, 9), (0, 16)), lesion_box=None)
    sampler = make_sampler([case], PATCH, oversample_foreground=0.5)
    expected_start = [-((p - s) // 2) if s < p else None for p, s in zip(PATCH, shape)]
    rng = np.random.default_rng(1)
    for _ in range(10):
        drawn = sampler.sample(rng)
        start = drawn["patch_start"]
        assert [int(start[a]) if expected_start[a] is not None else None for a in range(3)] == expected_start
        assert (drawn["seg"] == 1).sum() == np.prod(shape)  # the whole volume is inside the patch
        assert drawn["image"][0, 0].sum() == 0  # padding is zero


def test_foreground_oversampling_rate_matches_nnunet_expectation(tmp_path):
    # A 2x2x2 lesion and nothing else: most random patches miss it.
    box = ((3, 5), (30, 32), (4, 6))
    case = write_case(tmp_path, "tiny_fg", pancreas_box=None, lesion_box=box)
    sampler = make_sampler([case], PATCH, oversample_foreground=1 / 3)
    # Exact chance that a uniformly placed patch touches the lesion box.
    low, high = sampler._start_range(case.shape)
    hits = 1.0
    for axis in range(3):
        starts = np.arange(low[axis], high[axis] + 1)
        hits *= np.mean((starts < box[axis][1]) & (starts + PATCH[axis] > box[axis][0]))
    expected = 1 / 3 + 2 / 3 * hits
    rng = np.random.default_rng(0)
    n = 600
    contains = [bool((patch_of(sampler, sampler.sample(rng)["seg"]) > 0).any()) for _ in range(n)]
    fraction = np.mean(contains)
    assert fraction >= 1 / 3 - 0.02
    assert abs(fraction - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_forced_foreground_always_contains_foreground(tmp_path):
    case = write_case(tmp_path, "c0", pancreas_box=((0, 2), (0, 3), (37, 40)), lesion_box=((22, 24), (38, 40), (0, 2)))
    sampler = make_sampler([case], PATCH, region_size=(12, 20, 22), oversample_foreground=1.0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        assert (patch_of(sampler, sampler.sample(rng)["seg"]) > 0).any()


def test_lesion_centred_patches_contain_lesion(tmp_path):
    case = write_case(tmp_path, "c0", pancreas_box=((2, 22), (2, 38), (2, 38)), lesion_box=((20, 22), (35, 37), (3, 5)))
    rng = np.random.default_rng(0)
    sampler = make_sampler([case], PATCH, oversample_foreground=1.0, lesion_centred_probability=1.0)
    for _ in range(50):
        drawn = sampler.sample(rng)
        assert drawn["centred_on_label"] == 2
        assert (patch_of(sampler, drawn["seg"]) == 2).any()
    # Without the option the label is drawn uniformly among those present.
    sampler = make_sampler([case], PATCH, oversample_foreground=1.0, lesion_centred_probability=0.0)
    labels = [sampler.sample(rng)["centred_on_label"] for _ in range(400)]
    assert abs(np.mean(np.array(labels) == 2) - 0.5) < 0.1


def test_case_without_foreground_falls_back_to_random_patches(tmp_path):
    case = write_case(tmp_path, "empty", pancreas_box=None, lesion_box=None)
    sampler = make_sampler([case], PATCH, oversample_foreground=1.0)
    drawn = sampler.sample(np.random.default_rng(0))
    assert drawn["centred_on_label"] is None and drawn["image"].shape == (1, *PATCH)


def test_subtype_balanced_sampling_equalises_subtypes(tmp_path):
    subtypes = [0] * 6 + [1] * 2 + [2]
    cases = [write_case(tmp_path, f"c{i}", subtype=s) for i, s in enumerate(subtypes)]
    rng = np.random.default_rng(0)
    balanced = make_sampler(cases, PATCH, subtype_balanced=True)
    drawn = np.array([subtypes[balanced.draw_case(rng)] for _ in range(3000)])
    np.testing.assert_allclose(np.bincount(drawn, minlength=3) / len(drawn), [1 / 3] * 3, atol=0.04)
    uniform = make_sampler(cases, PATCH, subtype_balanced=False)
    drawn = np.array([subtypes[uniform.draw_case(rng)] for _ in range(3000)])
    np.testing.assert_allclose(np.bincount(drawn, minlength=3) / len(drawn), [6 / 9, 2 / 9, 1 / 9], atol=0.04)


def test_sampling_is_deterministic_given_a_seed(tmp_path):
    cases = [write_case(tmp_path, f"c{i}", subtype=i) for i in range(3)]
    patch = (8, 16, 16)
    aug = {"spatial": {"rotation_prob": 0.5, "scaling_prob": 0.5}}
    region = augmentation_region_size(aug, patch)

    def items(seed):
        torch.manual_seed(123)
        dataset = PatchDataset(make_sampler(cases, patch, region), build_augmentation(aug, patch), 6, seed=seed)
        return [dataset[i] for i in range(6)]

    first, again, other = items(0), items(0), items(1)
    for a, b in zip(first, again):
        assert a["case_id"] == b["case_id"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_dataloader_workers_differ_and_runs_repeat(tmp_path):
    cases = [write_case(tmp_path, f"c{i}", subtype=i) for i in range(3)]
    dataset = PatchDataset(make_sampler(cases, PATCH), samples_per_epoch=4, seed=0)

    def run():
        torch.manual_seed(7)
        loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_patches)
        return [batch["image"] for batch in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Items 0 and 1 come from different workers: they must not be the same draw.
    assert not torch.equal(first[0], first[1])
    # A new epoch (new worker seeds) draws new patches.
    torch.manual_seed(7)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_patches)
    epochs = [[batch["image"] for batch in loader] for _ in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*epochs))


def test_nnunet_batch_position_rule(tmp_path):
    dataset = PatchDataset(make_sampler([write_case(tmp_path, "c0")], PATCH), samples_per_epoch=4, batch_size=2)
    rng = np.random.default_rng(0)
    assert [dataset._force_foreground(i, rng) for i in range(4)] == [False, True, False, True]


def test_reads_only_from_memory_maps(tmp_path, monkeypatch):
    case = write_case(tmp_path, "c0")
    seen = []
    original_image, original_seg = CachedCase.load_image, CachedCase.load_seg

    def spy_image(self, mmap=True):
        array = original_image(self, mmap=mmap)
        seen.append(isinstance(array, np.memmap))
        return array

    def spy_seg(self, mmap=True):
        array = original_seg(self, mmap=mmap)
        seen.append(isinstance(array, np.memmap))
        return array

    monkeypatch.setattr(CachedCase, "load_image", spy_image)
    monkeypatch.setattr(CachedCase, "load_seg", spy_seg)
    sampler = make_sampler([case], PATCH)
    drawn = sampler.sample(np.random.default_rng(0))
    assert seen and all(seen)
    assert not isinstance(drawn["image"], np.memmap)  # a copy of the slab, not a view on the file
    start = drawn["patch_start"]
    full = np.load(case.image_path)
    np.testing.assert_array_equal(drawn["image"], read_region(full, start, PATCH))


def test_dataset_items_and_collate(tmp_path):
    cases = [write_case(tmp_path, "c0", subtype=2), write_case(tmp_path, "c1", subtype=None)]
    dataset = PatchDataset(make_sampler(cases, PATCH, oversample_foreground=1.0, lesion_centred_probability=1.0),
                           samples_per_epoch=3, seed=0)
    items = [dataset[i] for i in range(3)]
    for item in items:
        assert item["has_lesion"] is True
        assert item["subtype"] in (2, -1) and item["case_id"] in ("c0", "c1")
        assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2}
    batch = collate_patches(items)
    assert batch["image"].shape == (3, 1, *PATCH) and batch["label"].shape == (3, 1, *PATCH)
    assert batch["subtype"].dtype == torch.int64 and batch["has_lesion"].dtype == torch.bool
    assert batch["case_id"] == [item["case_id"] for item in items]


def test_rejects_unlabelled_cases_and_bad_sizes(tmp_path):
    unlabelled = write_case(tmp_path, "test_case", has_label=False)
    with pytest.raises(DataError, match="test_case"):
        make_sampler([unlabelled], PATCH)
    case = write_case(tmp_path, "c0")
    with pytest.raises(ValueError, match="region_size"):
        make_sampler([case], PATCH, region_size=(4, 16, 16))
    with pytest.raises(ValueError, match="lesion_centred_probability is a probability"):
        make_sampler([case], lesion_centred_probability=1.5)
    with pytest.raises(TypeError, match="subtype_balanced"):
        # no defaults in the code: the values live in conf/data/folder.yaml
        PatchSampler([case], PATCH, oversample_foreground=0.33, lesion_centred_probability=0.0)
    with pytest.raises(ValueError, match="transform"):
        PatchDataset(make_sampler([case], PATCH, region_size=(10, 16, 16)), transform=None)


def prepared_dataset(tmp_path: Path, subtypes=(0, 1, 2), val: int = 1, patch=PATCH, batch_size=2) -> PreparedDataset:
    """Cached cases as prepare_dataset leaves them, with a plan that only gives the patch and batch size."""
    cases = {f"c{i}": write_case(tmp_path, f"c{i}", subtype=s) for i, s in enumerate(subtypes)}
    ids = sorted(cases)
    return PreparedDataset(index=None, fingerprint=None, cache_root=tmp_path, cases=cases,
                           plan=SimpleNamespace(patch_size=patch, batch_size=batch_size),
                           split=SimpleNamespace(train=ids[:len(ids) - val], val=ids[len(ids) - val:], inner=[]))


def data_config(**sampling) -> dict:
    """A data config written in code: what it leaves out has conf/data/folder.yaml's values."""
    return {"root": "unused", "cache_dir": "unused", "iterations_per_epoch": 2, "num_workers": 0,
            "pin_memory": False, "sampling": sampling}


def test_data_module_reads_sampling_settings_under_their_config_names(tmp_path):
    # The bug: data.sampling.lesion_centred_probability became the sampler's lesion_centred and
    # subtype_balanced became case_sampling, with the defaults repeated in the code.
    sampling = {"oversample_foreground": 0.5, "lesion_centred_probability": 0.75, "subtype_balanced": True}
    module = PancreasDataModule(prepared_dataset(tmp_path), data_config(**sampling), compose_augmentation("none"))
    module.setup("fit")
    sampler = module.train_dataset.sampler
    assert {key: getattr(sampler, key) for key in sampling} == sampling


def test_sampling_settings_left_out_take_folder_yaml_values(tmp_path, monkeypatch):
    folder = OmegaConf.load(CONF / "data" / "folder.yaml").sampling
    assert sampling_settings(None) == sampling_settings(folder)
    assert sampling_settings({"subtype_balanced": True}).oversample_foreground == folder.oversample_foreground
    root = tmp_path / "conf"
    shutil.copytree(CONF / "augmentation", root / "augmentation")
    shutil.copytree(CONF / "limits", root / "limits")
    (root / "data").mkdir()
    edited = OmegaConf.load(CONF / "data" / "folder.yaml")
    edited.sampling.oversample_foreground = 0.9
    OmegaConf.save(edited, root / "data" / "folder.yaml")
    monkeypatch.setattr(settings, "config_dir", lambda: root)
    module = PancreasDataModule(prepared_dataset(tmp_path / "cache"), data_config(subtype_balanced=True),
                                {"spatial": {"enabled": False}})
    module.setup("fit")
    assert module.train_dataset.sampler.oversample_foreground == 0.9  # from folder.yaml, not from the code


def test_unknown_sampling_keys_are_errors_naming_them(tmp_path):
    module = PancreasDataModule(prepared_dataset(tmp_path), data_config(lesion_centred=1.0),
                                compose_augmentation("none"))
    with pytest.raises(ValueError, match=r"data\.sampling\.lesion_centred:.*lesion_centred_probability"):
        module.setup("fit")


MONAI_SHIFT = ("+augmentation.extra_transforms.shift={_target_: monai.transforms.ShiftIntensityd, "
               "keys: [image], offset: -1.0e6}")


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_pass_through_a_monai_transform_named_in_the_config(tmp_path, workers):
    augmentation = compose_augmentation("nnunet", MONAI_SHIFT)
    module = PancreasDataModule(prepared_dataset(tmp_path, subtypes=(0, 1, 2, 0)),
                                {**data_config(oversample_foreground=1.0, lesion_centred_probability=1.0,
                                               subtype_balanced=True), "num_workers": workers,
                                 "persistent_workers": False, "prefetch_factor": 2}, augmentation)
    module.setup("fit")
    assert module.train_dataset.sampler.region_size == augmentation_region_size(augmentation, PATCH)
    batches = list(module.train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (2, 1, *PATCH) and batch["label"].shape == (2, 1, *PATCH)
        assert set(torch.unique(batch["label"]).tolist()) <= {0, 1, 2}
        # voxel values of the cases lie in [0, 38400) before the shift: the MONAI transform ran on every patch
        assert batch["image"].max() < -0.9e6
        assert batch["has_lesion"].all()
