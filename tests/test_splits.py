"""Splits: the layout's own, or seeded subtype-stratified folds."""

import pytest

from pancreas_mtl.raw.convert import convert_to_nnunet
from pancreas_mtl.raw.layout import Case, DatasetIndex, discover
from pancreas_mtl.raw.splits import carve_inner, make_split, stratified_folds


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


def test_inner_validation_is_carved_from_training_stratified_and_seeded():
    index = _index((20, 20, 20))
    split = make_split(index, mode="kfold", fold=0)
    carved = carve_inner(split, index.labelled, 9, seed=3)
    assert len(carved.inner) == 9 and carved.val == split.val
    assert sorted(carved.train + carved.inner) == split.train and not set(carved.train) & set(carved.inner)
    assert [sum(cid.startswith(f"c{s}_") for cid in carved.inner) for s in range(3)] == [3, 3, 3]
    assert carved.inner == carve_inner(split, index.labelled, 9, seed=3).inner
    assert carved.inner != carve_inner(split, index.labelled, 9, seed=4).inner
    assert "inner validation 9" in carved.source
    assert carve_inner(split, index.labelled, 0, seed=3) is split


def test_inner_validation_shares_follow_the_subtypes_and_leave_cases_to_train_on():
    index = _index((2, 10, 30))
    split = make_split(index, mode="kfold", fold=0, num_folds=2)
    carved = carve_inner(split, index.labelled, 6, seed=0)
    per_subtype = [sum(cid.startswith(f"c{s}_") for cid in carved.inner) for s in range(3)]
    assert sum(per_subtype) == 6 and per_subtype[2] > per_subtype[1] >= 1
    assert per_subtype[0] == 0  # the one training case of subtype 0 stays in training
    with pytest.raises(ValueError, match="inner_validation.cases=20 leaves 1"):
        carve_inner(split, index.labelled, 20, seed=0)


def test_inner_validation_as_a_share_of_the_training_cases():
    index = _index((20, 20, 20))
    split = make_split(index, mode="kfold", fold=0)           # 48 training cases
    assert len(carve_inner(split, index.labelled, 0.25, seed=0).inner) == 12
    tiny = make_split(_index((4, 4, 4)), mode="kfold", fold=0, num_folds=4)   # 9 training cases
    assert len(carve_inner(tiny, _index((4, 4, 4)).labelled, 0.16, seed=0).inner) == 3   # one per subtype
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="a share in"):
            carve_inner(split, index.labelled, bad, seed=0)


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
