"""Experiment planning: nnU-Net v2's ResEnc rules on synthetic fingerprints (no files but conf/planning)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from pancreas_mtl.planning.plan import ChannelIntensity, Fingerprint, Plan
from pancreas_mtl.planning.planner import (
    PRESET_KEYS,
    batch_size_for,
    describe_plan,
    fingerprint_target_spacing,
    load_preset,
    plan_experiment,
)
from pancreas_mtl.planning.topology import (
    conv_and_pool_topology,
    feature_map_voxels,
    pad_to_multiple,
    shape_divisor,
    stage_shapes,
)

QUIZ_SPACING = (2.0, 0.7363, 0.7363)
QUIZ_SHAPE = (60, 119, 184)
CT = ChannelIntensity(mean=74.9, std=44.1, percentile_00_5=-56.0, percentile_99_5=180.0, median=76.0,
                      min=-1024.0, max=3071.0)


def _around(rng, median: float, low: float, high: float, n: int) -> np.ndarray:
    """n values in [low, high] whose median is exactly ``median``, shuffled."""
    below = rng.uniform(low, median, n // 2 - 1)
    above = rng.uniform(median, high, n - n // 2 - 1)
    return rng.permutation(np.concatenate([below, [median, median], above]))


def make_fingerprint(spacing=QUIZ_SPACING, shape=QUIZ_SHAPE, n: int = 250, spread=((1.5, 2.5), (0.6, 0.9)),
                     extent_sigma: float = 0.15, seed: int = 0, channel_name: str = "CT") -> Fingerprint:
    """Cases whose spacings have median ``spacing`` and whose resampled shapes have median ~``shape``.

    Each case covers a physical extent (median shape x spacing, jittered), so the voxel counts follow
    the spacing as in real scans.
    """
    rng = np.random.default_rng(seed)
    (z_low, z_high), (xy_low, xy_high) = spread
    z = _around(rng, spacing[0], z_low, z_high, n)
    xy = _around(rng, spacing[1], xy_low, xy_high, n)
    spacings = np.stack([z, xy, xy], axis=1)
    extent = np.exp(rng.normal(0.0, extent_sigma, (n, 3)))
    extent = extent / np.median(extent, axis=0) * np.asarray(shape) * np.asarray(spacing)
    shapes = np.maximum(1, np.round(extent / spacings)).astype(int)
    return Fingerprint(
        case_ids=[f"quiz_{i:03d}" for i in range(n)],
        spacings=[tuple(float(v) for v in s) for s in spacings],
        shapes_after_crop=[tuple(int(v) for v in s) for s in shapes],
        intensity=[CT],
        label_voxel_counts={0: 10_000_000, 1: 200_000, 2: 20_000},
        subtype_counts={0: 62, 1: 106, 2: 84},
        channel_names={0: channel_name},
    )


def uniform_fingerprint(spacing, shape, n: int = 20) -> Fingerprint:
    """Every case has the same spacing and shape."""
    return Fingerprint(case_ids=[f"case_{i}" for i in range(n)], spacings=[tuple(spacing)] * n,
                       shapes_after_crop=[tuple(shape)] * n, intensity=[CT], label_voxel_counts={},
                       subtype_counts={})


@pytest.fixture(scope="module")
def quiz() -> Fingerprint:
    return make_fingerprint()


def assert_consistent(plan: Plan) -> None:
    """Invariants every plan must satisfy."""
    n = plan.num_stages
    assert len(plan.kernel_sizes) == len(plan.features_per_stage) == len(plan.n_blocks_per_stage) == n
    assert len(plan.n_conv_per_stage_decoder) == n - 1
    assert plan.strides[0] == (1, 1, 1)
    assert plan.kernel_sizes[-1] == (3, 3, 3)
    divisor = shape_divisor(plan.strides)
    assert all(p % d == 0 for p, d in zip(plan.patch_size, divisor)), (plan.patch_size, divisor)
    assert plan.batch_size >= 1


# presets


@pytest.mark.parametrize("name", ["M", "L", "small"])
def test_presets_define_every_knob(name):
    preset = load_preset(name)
    assert set(PRESET_KEYS) <= set(preset)
    assert preset["name"] == name
    assert preset["spacing_scale"] == 1.0


def test_unknown_preset_names_the_file():
    with pytest.raises(FileNotFoundError, match="nope"):
        load_preset("nope")


# 1. quiz geometry


def test_quiz_plan_matches_nnunet_resenc_m(quiz):
    plan = plan_experiment(quiz, load_preset("M"))
    assert plan.target_spacing[0] == pytest.approx(2.0)
    assert 0.73 <= plan.target_spacing[1] <= 0.74 and 0.73 <= plan.target_spacing[2] <= 0.74
    assert 59 <= plan.median_shape[0] <= 60
    assert 118 <= plan.median_shape[1] <= 119
    assert 181 <= plan.median_shape[2] <= 184
    assert plan.patch_size == (64, 128, 192)
    assert plan.batch_size == 2
    assert plan.kernel_sizes == [(1, 3, 3)] + [(3, 3, 3)] * 5
    assert plan.strides == [(1, 1, 1), (1, 2, 2)] + [(2, 2, 2)] * 4
    assert stage_shapes(plan.patch_size, plan.strides)[-1] == (4, 4, 6)
    assert plan.features_per_stage == [32, 64, 128, 256, 320, 320]
    assert plan.n_blocks_per_stage == [1, 3, 4, 6, 6, 6]
    assert plan.n_conv_per_stage_decoder == [1] * 5
    assert plan.anisotropic_axis is None
    assert (plan.num_input_channels, plan.num_classes, plan.num_subtypes) == (1, 3, 3)
    (norm,) = plan.normalization
    assert norm.scheme == "ct"
    assert (norm.clip_low, norm.clip_high, norm.mean, norm.std) == (-56.0, 180.0, 74.9, 44.1)
    assert_consistent(plan)


def test_preset_may_be_a_dictconfig(quiz):
    plan = plan_experiment(quiz, OmegaConf.create(load_preset("M")), OmegaConf.create({"batch_size": 3}))
    assert plan.patch_size == (64, 128, 192) and plan.batch_size == 3


def test_l_uses_its_larger_budget_for_batch(quiz):
    plan_m, plan_l = plan_experiment(quiz, load_preset("M")), plan_experiment(quiz, load_preset("L"))
    # the patch is already the (padded) median case, so the extra memory goes into the batch
    assert plan_l.patch_size == plan_m.patch_size
    assert plan_l.batch_size > plan_m.batch_size
    assert plan_l.strides == plan_m.strides


def test_small_preset_gives_small_patches(quiz):
    plan = plan_experiment(quiz, load_preset("small"))
    assert plan.num_stages <= 5
    assert math.prod(plan.patch_size) < math.prod((64, 128, 192)) / 4
    assert plan.features_per_stage[0] == 16 and max(plan.features_per_stage) <= 128
    assert plan.batch_size == 2
    assert_consistent(plan)
    demo = plan_experiment(quiz, load_preset("small"), {"spacing_scale": 2.0})
    assert demo.target_spacing == pytest.approx(tuple(2 * s for s in plan.target_spacing))
    assert demo.patch_size == (32, 64, 96)
    assert_consistent(demo)


def test_non_ct_channel_is_zscored():
    plan = plan_experiment(make_fingerprint(channel_name="T2"), load_preset("small"))
    assert plan.normalization[0].scheme == "zscore"
    lower = plan_experiment(make_fingerprint(channel_name="ct"), load_preset("small"))
    assert lower.normalization[0].scheme == "ct"


# 2. anisotropy


def test_thick_slices_get_in_plane_kernels_and_no_early_z_pooling():
    fingerprint = make_fingerprint(spacing=(5.0, 0.7, 0.7), shape=(40, 256, 256),
                                   spread=((4.0, 6.0), (0.6, 0.8)))
    plan = plan_experiment(fingerprint, load_preset("M"))
    assert plan.anisotropic_axis == 0
    assert plan.kernel_sizes[0] == (1, 3, 3)
    assert plan.strides[1] == (1, 2, 2)
    # z (5 mm) catches up with in-plane after three in-plane poolings (0.7 * 8 = 5.6 mm)
    first_z_pool = next(i for i, s in enumerate(plan.strides) if s[0] == 2)
    assert first_z_pool >= 3
    assert all(k[0] == 1 for k in plan.kernel_sizes[:first_z_pool - 1])
    assert_consistent(plan)


def test_rare_thick_axis_takes_its_10th_percentile():
    # most cases 5 mm, a tenth at 1.5 mm; few slices -> nnU-Net takes the 10th percentile of z
    rng = np.random.default_rng(1)
    z = np.where(rng.random(100) < 0.15, 1.5, 5.0)
    fingerprint = Fingerprint(case_ids=[f"c{i}" for i in range(100)],
                              spacings=[(float(s), 0.7, 0.7) for s in z],
                              shapes_after_crop=[(20, 300, 300)] * 100, intensity=[CT],
                              label_voxel_counts={}, subtype_counts={})
    spacing = fingerprint_target_spacing(fingerprint, load_preset("M"))
    assert spacing[0] == pytest.approx(1.5)
    assert spacing[1:] == pytest.approx((0.7, 0.7))
    # with many slices the median is kept
    many_slices = Fingerprint(**{**fingerprint.__dict__, "shapes_after_crop": [(200, 300, 300)] * 100})
    assert fingerprint_target_spacing(many_slices, load_preset("M"))[0] == pytest.approx(5.0)


def test_isotropic_data_gets_3d_kernels_everywhere():
    plan = plan_experiment(uniform_fingerprint((1.0, 1.0, 1.0), (160, 160, 160)), load_preset("M"))
    assert plan.anisotropic_axis is None
    assert all(k == (3, 3, 3) for k in plan.kernel_sizes)
    assert all(s == (2, 2, 2) for s in plan.strides[1:])
    assert_consistent(plan)


def test_anisotropy_threshold_reaches_the_plan(quiz):
    """The preset's threshold is a plan value (resampling reads it there); the plan's separate axis
    follows from it and the target spacing."""
    plan = plan_experiment(quiz, load_preset("M"))
    assert plan.anisotropy_threshold == 3.0 and plan.anisotropic_axis is None     # 2.0 / 0.74 = 2.7
    lower = plan_experiment(quiz, load_preset("M"), {"anisotropy_threshold": 2.0})
    assert lower.anisotropy_threshold == 2.0 and lower.anisotropic_axis == 0
    assert "separate axis    z (anisotropy threshold 2;" in describe_plan(lower)


def test_preprocessing_key_follows_the_threshold_and_keeps_existing_keys(quiz):
    plan = plan_experiment(quiz, load_preset("M"))
    assert plan.preprocessing_key() == "59a41e066c"   # as before the threshold was a plan value: caches stay
    lower = plan_experiment(quiz, load_preset("M"), {"anisotropy_threshold": 2.0})
    higher = plan_experiment(quiz, load_preset("M"), {"anisotropy_threshold": 4.0})
    assert len({plan.preprocessing_key(), lower.preprocessing_key(), higher.preprocessing_key()}) == 3


def test_plans_written_before_the_threshold_load_with_nnunets():
    stored = plan_experiment(uniform_fingerprint((5.0, 0.7, 0.7), (40, 256, 256)), load_preset("small")).to_dict()
    assert stored["anisotropic_axis"] == 0              # written for readers of plan.json
    del stored["anisotropy_threshold"]
    restored = Plan.from_dict(stored)
    assert restored.anisotropy_threshold == 3.0 and restored.anisotropic_axis == 0


# 3. topology


@pytest.mark.parametrize("spacing, patch", [
    ((2.0, 0.7363, 0.7363), (59, 118, 181)),
    ((1.0, 1.0, 1.0), (128, 128, 128)),
    ((5.0, 0.7, 0.7), (40, 256, 256)),
    ((0.8, 0.8, 3.0), (200, 200, 30)),
    ((1.0, 1.0, 1.0), (9, 100, 13)),
])
def test_pooling_stops_at_four_voxels_and_patch_is_divisible(spacing, patch):
    topology = conv_and_pool_topology(spacing, patch, featuremap_min_edge_length=4)
    assert all(p % d == 0 for p, d in zip(topology.patch_size, topology.divisor))
    assert all(p >= q for p, q in zip(topology.patch_size, patch))
    assert topology.divisor == tuple(2 ** n for n in topology.pools_per_axis)
    # every pooling happened on a feature map of at least 8 voxels, so none is below 4 after it
    size = list(patch)
    for stride in topology.strides[1:]:
        for axis, s in enumerate(stride):
            if s == 2:
                assert size[axis] >= 8
                size[axis] = math.ceil(size[axis] / 2)
    bottleneck = [math.ceil(p / d) for p, d in zip(patch, topology.divisor)]
    assert all(edge >= 4 or n == 0 for edge, n in zip(bottleneck, topology.pools_per_axis))


def test_max_stages_caps_the_depth():
    deep = conv_and_pool_topology((1.0, 1.0, 1.0), (256, 256, 256), 4)
    capped = conv_and_pool_topology((1.0, 1.0, 1.0), (256, 256, 256), 4, max_stages=4)
    assert deep.num_stages == 7 and capped.num_stages == 4
    assert capped.divisor == (8, 8, 8) and len(capped.kernel_sizes) == 4


def test_tiny_dataset_gets_a_shallow_valid_plan():
    plan = plan_experiment(uniform_fingerprint((1.0, 1.0, 1.0), (12, 20, 20), n=3), load_preset("M"))
    assert plan.num_stages < 6
    assert plan.median_shape == (12, 20, 20)
    assert_consistent(plan)
    single = plan_experiment(uniform_fingerprint((1.0, 1.0, 1.0), (5, 6, 7), n=2), load_preset("M"))
    assert single.num_stages == 1 and single.strides == [(1, 1, 1)] and single.kernel_sizes == [(3, 3, 3)]
    assert single.n_conv_per_stage_decoder == []


def test_pad_to_multiple():
    assert pad_to_multiple((59, 118, 181), (16, 32, 32)) == (64, 128, 192)
    assert pad_to_multiple((64, 128, 192), (16, 32, 32)) == (64, 128, 192)
    assert pad_to_multiple((59.5, 1, 33), (16, 1, 32)) == (64, 1, 64)


def test_feature_map_size_matches_dynamic_network_architectures():
    # value printed by nnunetv2's residual_encoder_unet_planners.py for this network (deep supervision on)
    strides = [(1, 1, 1)] + [(2, 2, 2)] * 5
    size = feature_map_voxels((128, 128, 128), strides, [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6],
                              [1] * 5, num_classes=3, deep_supervision=True)
    assert size == 558_319_104


# 4. memory budget and batch size


def test_larger_budget_never_gives_a_smaller_patch():
    fingerprint = uniform_fingerprint((1.0, 0.8, 0.8), (300, 400, 400))
    patches = [plan_experiment(fingerprint, load_preset("M"), {"vram_target_gb": gb}).patch_size
               for gb in (2, 4, 8, 16, 24)]
    volumes = [math.prod(p) for p in patches]
    assert volumes == sorted(volumes) and volumes[0] < volumes[-1]
    plan_m = plan_experiment(fingerprint, load_preset("M"))
    plan_l = plan_experiment(fingerprint, load_preset("L"))
    assert all(l_ >= m for l_, m in zip(plan_l.patch_size, plan_m.patch_size))
    assert math.prod(plan_l.patch_size) > math.prod(plan_m.patch_size)


def test_small_budget_shrinks_the_patch_towards_the_median_aspect(quiz):
    full = plan_experiment(quiz, load_preset("M"))
    small = plan_experiment(quiz, load_preset("M"), {"vram_target_gb": 2})
    assert all(s <= f for s, f in zip(small.patch_size, full.patch_size))
    assert math.prod(small.patch_size) < math.prod(full.patch_size)
    assert small.batch_size == 2
    assert_consistent(small)


def test_batch_size_from_headroom_capped_by_dataset_fraction_and_floored():
    preset = load_preset("M")
    budget = 680_000_000
    # headroom of 4x the reference -> 4 x reference batch of 2
    assert batch_size_for(budget // 4, (64, 64, 64), 1e12, preset) == 8
    # one batch covers at most 5% of the dataset's voxels
    capped = {**preset, "max_dataset_fraction_per_batch": 0.05}
    assert batch_size_for(budget // 4, (64, 64, 64), 64 ** 3 * 100, capped) == 5
    # never below the minimum
    assert batch_size_for(budget // 4, (64, 64, 64), 64 ** 3 * 10, capped) == 2
    assert batch_size_for(budget * 3, (64, 64, 64), 1e12, preset) == 2
    assert batch_size_for(budget // 4, (64, 64, 64), 1e12, {**preset, "max_batch_size": 3}) == 3


def test_batch_cap_in_a_full_plan():
    fingerprint = uniform_fingerprint((1.0, 1.0, 1.0), (32, 32, 32), n=10)
    free = plan_experiment(fingerprint, load_preset("M"))
    capped = plan_experiment(fingerprint, load_preset("M"), {"max_dataset_fraction_per_batch": 0.05})
    assert free.batch_size > 2
    assert capped.batch_size == 2  # 5% of 10 cases is half a patch: the minimum wins


# 5. overrides


def test_patch_size_override_recomputes_topology(quiz):
    plan = plan_experiment(quiz, load_preset("M"), {"patch_size": (32, 64, 64)})
    assert plan.patch_size == (32, 64, 64)
    assert plan.strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert plan.num_stages == 5 and len(plan.features_per_stage) == 5
    assert_consistent(plan)
    padded = plan_experiment(quiz, load_preset("M"), {"patch_size": [50, 100, 150]})
    assert padded.patch_size == (56, 112, 160)  # 3, 4 and 5 poolings
    assert_consistent(padded)


def test_target_spacing_override_moves_median_shape(quiz):
    plan = plan_experiment(quiz, load_preset("M"), {"target_spacing": (4.0, 1.5, 1.5)})
    assert plan.target_spacing == (4.0, 1.5, 1.5)
    assert plan.median_shape[0] == pytest.approx(30, abs=1)
    assert plan.median_shape[1] == pytest.approx(58, abs=2)
    assert plan.median_shape[2] == pytest.approx(90, abs=2)
    # the patch follows the (smaller) median case
    assert all(p <= 2 * m for p, m in zip(plan.patch_size, plan.median_shape))
    assert_consistent(plan)


def test_spacing_scale_scales_spacing_and_shrinks_shape(quiz):
    base = plan_experiment(quiz, load_preset("M"))
    scaled = plan_experiment(quiz, load_preset("M"), {"spacing_scale": 2.0})
    assert scaled.target_spacing == pytest.approx(tuple(2 * s for s in base.target_spacing))
    assert all(abs(s - b / 2) <= 1 for s, b in zip(scaled.median_shape, base.median_shape))
    assert_consistent(scaled)


def test_batch_size_override_and_unknown_keys(quiz):
    assert plan_experiment(quiz, load_preset("M"), {"batch_size": 5}).batch_size == 5
    with pytest.raises(KeyError, match="patch_sise"):
        plan_experiment(quiz, load_preset("M"), {"patch_sise": (1, 2, 3)})
    with pytest.raises(ValueError, match="patch_size"):
        plan_experiment(quiz, load_preset("M"), {"patch_size": (64, 128)})


def test_incomplete_preset_and_bad_fingerprint_are_named(quiz):
    preset = load_preset("M")
    del preset["max_stages"]
    with pytest.raises(KeyError, match="max_stages"):
        plan_experiment(quiz, preset)
    broken = Fingerprint(case_ids=["quiz_0_001"], spacings=[(0.0, 1.0, 1.0)], shapes_after_crop=[(1, 2, 3)],
                         intensity=[CT], label_voxel_counts={}, subtype_counts={})
    with pytest.raises(ValueError, match="quiz_0_001"):
        plan_experiment(broken, load_preset("M"))


# 6. serialisation and summary


@pytest.mark.parametrize("name, overrides", [("M", None), ("small", {"spacing_scale": 2.0})])
def test_plan_json_round_trip(quiz, name, overrides):
    plan = plan_experiment(quiz, load_preset(name), overrides)
    restored = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    assert restored.preprocessing_key() == plan.preprocessing_key()


def test_describe_plan_lists_every_stage(quiz):
    plan = plan_experiment(quiz, load_preset("M"))
    text = describe_plan(plan)
    assert "64 x 128 x 192" in text and "ct: clip [-56, 180]" in text
    assert "4 x 4 x 6" in text  # bottleneck feature map
    assert len(text.splitlines()) == 8 + 1 + plan.num_stages
