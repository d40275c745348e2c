"""The dataset as it is read (data/summary.py) and why the planner chose its plan (planning/explain.py):
counts per split and subtype, per-case spacing, shape, volumes and intensities against hand-made cases,
histograms, mid-lesion slices, in both layouts."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_mtl.raw.convert import convert_to_nnunet
from pancreas_mtl.raw.summary import (
    by_subtype,
    mid_lesion_slice,
    mid_lesion_views,
    split_subtype_counts,
    summarise_dataset,
)
from pancreas_mtl.planning.explain import explain_plan
from pancreas_mtl.planning.fingerprint import compute_fingerprint
from pancreas_mtl.planning.planner import load_preset, plan_experiment
from pancreas_mtl.tables import Table
from tests.conftest import make_case_arrays, write_distributed_dataset


def test_counts_per_split_and_subtype(distributed_dataset):
    summary = summarise_dataset(distributed_dataset)
    counts = {row["split"]: row for row in split_subtype_counts(summary.index)}
    assert counts["train"]["subtype 0"] == 2 and counts["validation"]["subtype 2"] == 1
    assert counts["test"]["no subtype"] == 2 and counts["test"]["labelled"] == 0 and counts["train"]["total"] == 6
    assert len(summary.cases) == 9  # the labelled cases


def test_case_rows_match_the_arrays(distributed_dataset):
    summary = summarise_dataset(distributed_dataset, splits=["validation"], intensity_range=(-300, 300), bins=60)
    image, mask = make_case_arrays(np.random.default_rng(0))  # shapes are the same for every case
    row = summary.cases[0]
    assert (row["spacing_z"], row["spacing_y"], row["spacing_x"]) == pytest.approx((2.0, 0.8, 0.8))
    assert (row["shape_z"], row["shape_y"], row["shape_x"]) == mask.shape
    voxel_ml = 2.0 * 0.8 * 0.8 / 1000
    assert row["lesion_ml"] == pytest.approx((mask == 2).sum() * voxel_ml)
    assert row["pancreas_ml"] == pytest.approx((mask == 1).sum() * voxel_ml)
    assert 40 < row["lesion_mean"] < 80 and 80 < row["pancreas_mean"] < 120  # conftest: lesion 60, pancreas 100 HU
    assert summary.bin_edges.shape == (61,)
    lesion_voxels = sum(int(h.sum()) for h in summary.histograms["lesion"].values())
    assert lesion_voxels == pytest.approx(sum(r["lesion_ml"] for r in summary.cases) / voxel_ml)
    assert set(summary.histograms["pancreas"]) == {0, 1, 2}


def test_both_layouts_give_the_same_cases(distributed_dataset, tmp_path):
    converted = convert_to_nnunet(distributed_dataset, tmp_path / "Dataset501_Pancreas")
    rows = [{r["case_id"]: (r["subtype"], r["lesion_ml"]) for r in summarise_dataset(root).cases}
            for root in (distributed_dataset, converted.root)]
    assert rows[0] == rows[1]


def test_by_subtype_and_errors(distributed_dataset):
    summary = summarise_dataset(distributed_dataset)
    table = by_subtype(summary.cases, ["lesion_ml"])
    assert table.column("subtype") == ["subtype 0", "subtype 1", "subtype 2", "all"]
    assert table.column("cases") == [3, 3, 3, 9]
    with pytest.raises(ValueError, match="no labelled case in splits test"):
        summarise_dataset(distributed_dataset, splits=["test"])
    with pytest.raises(ValueError, match="low < high"):
        summarise_dataset(distributed_dataset, intensity_range=(10, 0))


def test_mid_lesion_slice_and_views(tmp_path):
    mask = np.zeros((10, 4, 4), np.uint8)
    mask[2:8] = 1
    assert mid_lesion_slice(mask, 2) == 4  # no lesion: the middle of the gland
    mask[6:9, 1, 1] = 2
    assert mid_lesion_slice(mask, 2) == 7
    assert mid_lesion_slice(np.zeros((6, 2, 2), np.uint8), 2) == 3
    root = write_distributed_dataset(tmp_path / "quiz", train_per_subtype=2, validation_per_subtype=0, test_cases=0)
    views = mid_lesion_views(root, cases_per_subtype=1)
    assert [v.subtype for v in views] == [0, 1, 2]
    assert views[0].image.shape == views[0].labels.shape == (28, 36) and (views[0].labels == 2).any()
    assert views[0].spacing_yx == pytest.approx((0.8, 0.8))


def test_tables_print_render_and_save(tmp_path):
    table = Table([{"a": 1.23456, "b": None}, {"a": float("nan"), "c": "x<y"}], title="t")
    assert table.columns == ["a", "b", "c"] and str(table).splitlines()[0] == "t"
    assert "1.2346" in str(table) and "x&lt;y" in table._repr_html_()
    assert table.to_csv(tmp_path / "t.csv").read_text().splitlines() == ["a,b,c", "1.2346,,", ",,x<y"]
    with pytest.raises(KeyError, match="columns: a, b, c"):
        table.column("d")


def test_explain_plan_gives_the_planners_plan_and_its_reasons(distributed_dataset):
    from pancreas_mtl.raw.layout import discover

    fingerprint = compute_fingerprint(discover(distributed_dataset), progress=False)
    preset = load_preset("small")
    plan, text = explain_plan(fingerprint, preset)
    assert plan == plan_experiment(fingerprint, preset)
    assert "percentile 50 per axis: 2 x 0.8 x 0.8 mm" in text and "coarsest axis z: 2.50x" in text
    assert "patch: starts at" in text and "topology:" in text and "plan (preset small, network resenc)" in text
    _, overridden = explain_plan(fingerprint, preset, {"target_spacing": [2.0, 1.6, 1.6], "patch_size": [8, 16, 16]})
    assert "set by the override target_spacing" in overridden and "the override patch_size" in overridden
