"""Augmentation: nnU-Net defaults from config, group switches, shapes, label values, geometry conventions."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.dataset.augmentation import (
    NNUNET_DEFAULTS,
    RandGaussianNoiseVarianced,
    augmentation_region_size,
    build_augmentation,
    resolve_augmentation_config,
)
from pancreas_mtl.dataset.spatial_augmentation import RandAffinePatchd, spatial_region_size

CONF = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
PATCH = (8, 16, 16)
GROUPS = ("spatial", "noise_blur", "intensity", "lowres", "gamma", "mirror")
# Every probability of each group forced to 1, so that a group that is on visibly acts.
ALWAYS = {
    "spatial": {"rotation_prob": 1.0, "scaling_prob": 1.0},
    "noise_blur": {"noise_prob": 1.0, "blur_prob": 1.0, "blur_prob_per_channel": 1.0},
    "intensity": {"brightness_prob": 1.0, "contrast_prob": 1.0},
    "lowres": {"prob": 1.0, "prob_per_channel": 1.0, "zoom_range": [0.5, 0.5]},
    "gamma": {"prob": 1.0, "inverted_prob": 1.0},
    "mirror": {"prob": 1.0},
}
NEVER = {
    "spatial": {"rotation_prob": 0.0, "scaling_prob": 0.0, "elastic_prob": 0.0},
    "noise_blur": {"noise_prob": 0.0, "blur_prob": 0.0},
    "intensity": {"brightness_prob": 0.0, "contrast_prob": 0.0},
    "lowres": {"prob": 0.0},
    "gamma": {"prob": 0.0, "inverted_prob": 0.0},
    "mirror": {"prob": 0.0},
}


def only(group: str | None, probabilities=ALWAYS) -> dict:
    """A config with every group off except ``group`` (with the given probabilities)."""
    cfg = {g: {"enabled": False} for g in GROUPS}
    if group is not None:
        cfg[group] = {"enabled": True, **probabilities[group]}
    return cfg


def make_region(region, seed=0, channels=1):
    """(image, label) region: smooth random image and a pancreas box holding a lesion box at the centre."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(channels, *region)).astype(np.float32)).cumsum(-1) / 4
    label = torch.zeros((1, *region), dtype=torch.int8)
    centre = [r // 2 for r in region]
    label[0, centre[0] - 3:centre[0] + 3, centre[1] - 6:centre[1] + 6, centre[2] - 6:centre[2] + 6] = 1
    label[0, centre[0] - 1:centre[0] + 2, centre[1] - 2:centre[1] + 3, centre[2] - 2:centre[2] + 3] = 2
    return image, label


def centre_crop(tensor, patch=PATCH):
    start = [(r - p) // 2 for r, p in zip(tensor.shape[1:], patch)]
    return tensor[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]]


def run(cfg, image, label, seed=0, patch=PATCH):
    transform = build_augmentation(cfg, patch)
    transform.set_random_state(seed=seed)
    return transform({"image": image.clone(), "label": label.clone()})


@pytest.mark.parametrize("name", ["nnunet", "none", "light"])
def test_config_files_load_and_build(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    resolved = resolve_augmentation_config(cfg)
    assert set(resolved) == set(NNUNET_DEFAULTS)
    region = augmentation_region_size(cfg, PATCH)
    image, label = make_region(region)
    out = run(cfg, image, label)
    assert out["image"].shape == (1, *PATCH) and out["label"].shape == (1, *PATCH)


def test_nnunet_yaml_holds_the_python_defaults():
    assert resolve_augmentation_config(OmegaConf.load(CONF / "nnunet.yaml")) == NNUNET_DEFAULTS
    assert resolve_augmentation_config(None) == NNUNET_DEFAULTS


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="spatial.rotation_probability"):
        resolve_augmentation_config({"spatial": {"rotation_probability": 0.5}})
    with pytest.raises(ValueError, match="mirroring"):
        resolve_augmentation_config({"mirroring": {"enabled": False}})


def test_region_size_covers_rotation_and_scaling():
    assert spatial_region_size(PATCH) == spatial_region_size(PATCH, (0, 0, 0), (0.7, 1.0)) != PATCH  # +1 voxel margin
    in_plane = spatial_region_size(PATCH, (30, 0, 0), (1.0, 1.0))
    full = spatial_region_size(PATCH, (30, 30, 30), (0.7, 1.4))
    assert all(f >= i >= p for f, i, p in zip(full, in_plane, PATCH))
    assert in_plane[0] == spatial_region_size(PATCH)[0]  # rotating about z leaves z alone
    assert all((r - p) % 2 == 0 for r, p in zip(full, PATCH))
    assert augmentation_region_size({"spatial": {"enabled": False}}, PATCH) == PATCH


@pytest.mark.parametrize("seed", range(4))
def test_full_pipeline_shapes_dtypes_and_label_values(seed):
    cfg = {**ALWAYS, "spatial": {"rotation_prob": 1.0, "scaling_prob": 1.0, "elastic_prob": 1.0}}
    region = augmentation_region_size(cfg, PATCH)
    image, label = make_region(region, seed=seed, channels=2)
    out = run(cfg, image, label, seed=seed)
    assert out["image"].shape == (2, *PATCH) and out["image"].dtype == torch.float32
    assert out["label"].shape == (1, *PATCH) and out["label"].dtype == torch.uint8
    assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    assert torch.isfinite(out["image"]).all()


@pytest.mark.parametrize("cfg", [only(None), {g: {"enabled": True, **NEVER[g]} for g in GROUPS},
                                 OmegaConf.load(CONF / "none.yaml")], ids=["all_off", "all_p0", "none_yaml"])
def test_without_augmentation_the_output_is_the_centre_crop(cfg):
    image, label = make_region((14, 22, 24))
    out = run(cfg, image, label)
    assert torch.equal(out["image"], centre_crop(image))
    assert torch.equal(out["label"], centre_crop(label).to(torch.uint8))


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_acts_when_on_and_can_be_switched_off(group):
    image, label = make_region(spatial_region_size(PATCH, (30, 30, 30), (0.7, 1.4)))
    crop = centre_crop(image)
    on = run(only(group), image, label)
    assert not torch.allclose(on["image"], crop)
    cfg = only(group)
    cfg[group]["enabled"] = False
    off = run(cfg, image, label)
    assert torch.equal(off["image"], crop)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mirroring_flips_image_and_label_together(axis):
    image, label = make_region((10, 18, 20))
    label[0, 0, 0, 0] = 2  # break the symmetry of the boxes
    cfg = only("mirror")
    cfg["mirror"]["axes"] = [axis]
    out = run(cfg, image, label)
    assert torch.equal(out["image"], torch.flip(centre_crop(image), dims=[axis + 1]))
    assert torch.equal(out["label"], torch.flip(centre_crop(label), dims=[axis + 1]).to(torch.uint8))


def test_zero_rotation_through_the_resampler_is_the_centre_crop():
    image, label = make_region((12, 21, 24))
    transform = RandAffinePatchd(["image", "label"], PATCH, rotation_prob=1.0, rotation_range_deg=(0, 0, 0))
    transform.set_random_state(seed=0)
    out = transform({"image": image, "label": label})
    assert transform.matrix is not None  # the resampling path ran, not the crop shortcut
    torch.testing.assert_close(out["image"], centre_crop(image), atol=1e-4, rtol=0)
    assert torch.equal(out["label"], centre_crop(label))


def test_rotation_moves_image_and_label_alike():
    region = spatial_region_size(PATCH, (30, 30, 30))
    _, label = make_region(region)
    image = label.float()
    transform = RandAffinePatchd(["image", "label"], PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30))
    transform.set_random_state(seed=3)
    out = transform({"image": image, "label": label})
    assert not torch.equal(out["label"], centre_crop(label))
    assert (out["image"].round().to(torch.int8) == out["label"]).float().mean() > 0.95


def test_in_plane_rotation_keeps_slices_apart():
    # A label that differs only along z must not change under rotation about the z axis.
    region = spatial_region_size(PATCH, (30, 0, 0))
    label = torch.zeros((1, *region), dtype=torch.int8)
    label[0, region[0] // 2:] = 1
    transform = RandAffinePatchd(["label"], PATCH, rotation_prob=1.0, rotation_range_deg=(30, 0, 0), mode="nearest")
    transform.set_random_state(seed=0)
    assert torch.equal(transform({"label": label})["label"], centre_crop(label))


def test_scaling_above_one_shrinks_objects():
    region = spatial_region_size(PATCH, scaling_range=(2.0, 2.0))
    _, label = make_region(region)
    transform = RandAffinePatchd(["label"], PATCH, scaling_prob=1.0, scaling_range=(2.0, 2.0), mode="nearest")
    transform.set_random_state(seed=0)
    out = transform({"label": label})["label"]
    assert 0 < (out > 0).sum() < (centre_crop(label) > 0).sum()


def test_noise_variance_is_sampled_like_nnunet():
    transform = RandGaussianNoiseVarianced("image", prob=1.0, variance_range=(0.04, 0.04))
    transform.set_random_state(seed=0)
    image = torch.zeros((1, 16, 32, 32))
    assert abs(transform({"image": image})["image"].std().item() - 0.2) < 0.01


def test_seeded_pipelines_repeat_and_survive_pickling():
    cfg = {**ALWAYS, "spatial": {"rotation_prob": 0.5, "scaling_prob": 0.5}, "mirror": {"prob": 0.5}}
    region = augmentation_region_size(cfg, PATCH)
    image, label = make_region(region)
    transform = build_augmentation(cfg, PATCH)
    clone = pickle.loads(pickle.dumps(transform))
    transform.set_random_state(seed=5)
    clone.set_random_state(seed=5)
    a = transform({"image": image.clone(), "label": label.clone()})
    b = clone({"image": image.clone(), "label": label.clone()})
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    transform.set_random_state(seed=6)
    c = transform({"image": image.clone(), "label": label.clone()})
    assert not torch.equal(a["image"], c["image"])
