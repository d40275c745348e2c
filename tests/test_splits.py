"""Splits: the layout's own, or seeded subtype-stratified folds."""

import pytest

from pancreas_mtl.data.convert import convert_to_nnunet
from pancreas_mtl.data.layout import Case, DatasetIndex, discover
from pancreas_mtl.data.splits import make_split, stratified_folds


def _index(num_per_subtype=(5, 10, 8)):
    cases = [Case(f"c{s}_{i:02d}", (), None, s, "train") for s, n in enumerate(num_per_subtype) for i in range(n)]
    cases = [Case(c.case_id, (), c.case_id, c.subtype, c.split) for c in cases]  # labelled
    return DatasetIndex(root=None, layout="nnunet", name="x", channel_names={0: "CT"}, labels={}, file_ending=".nii.gz",
                        cases=cases)


def test_folds_are_stratified_disjoint_and_seeded():
    index = _index()
    folds = stratified_folds(index.labelled, 5, seed=1)
    ids = [cid for fold in folds for cid in fold]
    assert sorted(ids) == sorted(c.case_id for c in index.cases)
    for fold in folds:
        assert sum(cid.startswith("c1") for cid in fold) == 2  # 10 subtype-1 cases over 5 folds
    assert folds == stratified_folds(index.labelled, 5, seed=1)
    assert folds != stratified_folds(index.labelled, 5, seed=2)


def test_kfold_split_selects_the_fold():
    split = make_split(_index(), mode="auto", fold=3)
    assert "5-fold" in split.source and not set(split.train) & set(split.val)
    assert len(split.train) + len(split.val) == 23
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        make_split(_index(), mode="kfold", fold=5)


def test_validation_folder_and_splits_file(distributed_dataset, tmp_path):
    index = discover(distributed_dataset)
    split = make_split(index)
    assert split.source == "validation folder"
    assert split.val == sorted(c.case_id for c in index.split("validation"))
    converted = convert_to_nnunet(distributed_dataset, tmp_path / "nn")
    same = make_split(converted)
    assert (same.train, same.val) == (split.train, split.val)
    with pytest.raises(ValueError, match="fold 1 requested"):
        make_split(converted, fold=1)
