"""Preprocessing cache: reuse, invalidation on source change, incomplete entries rebuilt, bad cases listed."""

import os
import time

import numpy as np
import pytest

from pancreas_mtl.raw.errors import DatasetError
from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.raw.layout import discover
from pancreas_mtl.dataset.cache import build_cache, cached_entry, dataset_cache_root
from tests.conftest import lps_affine, make_case_arrays
from tests.test_resampling import small_plan


@pytest.fixture
def cache(distributed_dataset, tmp_path):
    index = discover(distributed_dataset)
    return index, small_plan(), dataset_cache_root(tmp_path / "cache", index)


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_build_writes_mmappable_entries(cache):
    index, plan, root = cache
    entries = build_cache(index, plan, root, cases=index.labelled, progress=False)
    assert [e.case_id for e in entries] == [c.case_id for c in index.labelled]
    entry = entries[0]
    image = entry.load_image()
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.shape == (1, *entry.shape)
    assert entry.load_seg().dtype == np.int8
    locations = entry.load_foreground_locations()
    seg = entry.load_seg()
    assert set(locations[:, 0]) == {1, 2}
    assert all(seg[z, y, x] == label for label, z, y, x in locations[:50])
    np.testing.assert_allclose(entry.properties()["affine"], lps_affine(), rtol=1e-6)
    assert (root / plan.preprocessing_key() / "plan.json").is_file()
    assert not list((root / plan.preprocessing_key()).glob(".*tmp*"))


def test_second_build_reuses_everything(cache):
    index, plan, root = cache
    build_cache(index, plan, root, progress=False)
    before = _mtimes(root / plan.preprocessing_key())
    build_cache(index, plan, root, progress=False)
    after = _mtimes(root / plan.preprocessing_key())
    assert {k: v for k, v in after.items() if k != "plan.json"} == {k: v for k, v in before.items() if k != "plan.json"}


def test_changed_source_and_incomplete_entry_are_rebuilt(cache):
    index, plan, root = cache
    build_cache(index, plan, root, cases=index.labelled, progress=False)
    folder = root / plan.preprocessing_key()
    changed, truncated, kept = index.labelled[:3]
    time.sleep(0.01)
    image, mask = make_case_arrays(np.random.default_rng(99), lesion_offset=(0, 2, 2))
    write_nifti(image, lps_affine(), changed.image_paths[0])
    npy = folder / f"{truncated.case_id}_image.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # killed mid-write of an older version
    kept_mtime = (folder / f"{kept.case_id}_image.npy").stat().st_mtime_ns
    index = discover(index.root)
    assert cached_entry(folder, changed, plan.preprocessing_key()) is None
    assert cached_entry(folder, truncated, plan.preprocessing_key()) is None
    entries = {e.case_id: e for e in build_cache(index, plan, root, cases=index.labelled, progress=False)}
    assert entries[truncated.case_id].load_image().shape == (1, *entries[truncated.case_id].shape)
    assert (folder / f"{kept.case_id}_image.npy").stat().st_mtime_ns == kept_mtime


def test_missing_json_marks_entry_incomplete(cache):
    index, plan, root = cache
    build_cache(index, plan, root, cases=index.labelled[:1], progress=False)
    folder = root / plan.preprocessing_key()
    case = index.labelled[0]
    os.remove(folder / f"{case.case_id}.json")
    assert cached_entry(folder, case, plan.preprocessing_key()) is None


def test_other_plan_gets_its_own_folder(cache):
    index, plan, root = cache
    build_cache(index, plan, root, cases=index.labelled[:1], progress=False)
    other = small_plan(target_spacing=(4.0, 1.6, 1.6))
    entry = build_cache(index, other, root, cases=index.labelled[:1], progress=False)[0]
    assert other.preprocessing_key() != plan.preprocessing_key()
    assert entry.folder.name == other.preprocessing_key() and entry.shape == (6, 14, 18)


def test_bad_cases_are_listed_and_good_ones_kept(cache):
    index, plan, root = cache
    index.labelled[0].image_paths[0].write_bytes(b"broken")
    with pytest.raises(DatasetError, match=index.labelled[0].case_id):
        build_cache(index, plan, root, cases=index.labelled, progress=False)
    folder = root / plan.preprocessing_key()
    assert cached_entry(folder, index.labelled[1], plan.preprocessing_key()) is not None


def test_parallel_build_matches_inline(cache, tmp_path):
    index, plan, root = cache
    inline = build_cache(index, plan, root, cases=index.labelled[:2], progress=False)
    parallel = build_cache(index, plan, tmp_path / "other", cases=index.labelled[:2], num_workers=2, progress=False)
    for a, b in zip(inline, parallel):
        np.testing.assert_array_equal(a.load_image(), b.load_image())
        np.testing.assert_array_equal(a.load_seg(), b.load_seg())
