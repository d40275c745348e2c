"""Augmentation: values from conf/augmentation/ only, group switches, MONAI transforms from the config,
array and dictionary versions, shapes, label values, geometry conventions."""

from __future__ import annotations

import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from monai.transforms import RandGaussianSmooth, RandSimulateLowResolution
from omegaconf import OmegaConf

from pancreas_mtl.dataset import settings
from pancreas_mtl.dataset.augmentation import (
    RandGaussianNoiseVariance,
    RandGaussianNoiseVarianced,
    RandPerChannel,
    RandPerChanneld,
    augmentation_region_size,
    build_augmentation,
)
from pancreas_mtl.dataset.settings import augmentation_settings, sampling_settings
from pancreas_mtl.dataset.spatial_augmentation import (
    RandSpatialNNUNet,
    RandSpatialNNUNetd,
    spatial_region_size,
)

CONF_ROOT = Path(__file__).resolve().parents[1] / "conf"
CONF = CONF_ROOT / "augmentation"
PRESETS = ("nnunet", "none", "light")
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


def compose_augmentation(name: str, *overrides: str, conf: Path = CONF_ROOT):
    """The ``augmentation`` node as Hydra composes it for a run (``augmentation=name overrides...``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(overrides=[f"+augmentation={name}", *overrides]).augmentation


def conf_copy(tmp_path: Path, edit) -> Path:
    """A copy of conf/augmentation/ (and conf/data/folder.yaml) whose nnunet.yaml ``edit`` changed."""
    root = tmp_path / "conf"
    shutil.copytree(CONF, root / "augmentation")
    (root / "data").mkdir()
    shutil.copy(CONF_ROOT / "data" / "folder.yaml", root / "data" / "folder.yaml")
    nnunet = OmegaConf.load(root / "augmentation" / "nnunet.yaml")
    edit(nnunet)
    OmegaConf.save(nnunet, root / "augmentation" / "nnunet.yaml")
    return root


def leaves(node, prefix=""):
    """{dotted key: value} of a nested dict's leaves."""
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_compose_and_build(name):
    cfg = compose_augmentation(name)
    assert augmentation_settings(cfg).name == name
    region = augmentation_region_size(cfg, PATCH)
    image, label = make_region(region)
    out = run(cfg, image, label)
    assert out["image"].shape == (1, *PATCH) and out["label"].shape == (1, *PATCH)


@pytest.mark.parametrize("name", ["light", "none"])
def test_presets_are_nnunet_yaml_plus_what_they_list(name):
    # The bug: light.yaml said unlisted keys keep nnunet.yaml's values, but it did not build on
    # nnunet.yaml; a Python copy of the values filled them in, and the run config did not show them.
    nnunet = leaves(OmegaConf.to_container(OmegaConf.load(CONF / "nnunet.yaml")))
    listed = leaves({k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")).items()
                     if k != "defaults"})
    composed = leaves(OmegaConf.to_container(compose_augmentation(name)))
    assert set(composed) == set(nnunet)
    assert {key: composed[key] for key in nnunet if key not in listed} == \
        {key: value for key, value in nnunet.items() if key not in listed}
    assert {key: composed[key] for key in listed} == listed


def test_unlisted_keys_follow_nnunet_yaml(tmp_path):
    def edit(nnunet):
        nnunet.noise_blur.blur_sigma = [1.5, 2.5]
        nnunet.gamma.retain_stats = False

    light = compose_augmentation("light", conf=conf_copy(tmp_path, edit))
    assert light.noise_blur.blur_sigma == [1.5, 2.5] and light.gamma.retain_stats is False
    pipeline = build_augmentation(light, PATCH)
    blur = next(t.per_channel.transform for t in pipeline.transforms if isinstance(t, RandPerChanneld)
                and isinstance(t.per_channel.transform, RandGaussianSmooth))
    assert blur.sigma_x == (1.5, 2.5)


def test_configs_given_in_code_are_changes_to_nnunet_yaml(tmp_path, monkeypatch):
    assert asdict(augmentation_settings(None)) == OmegaConf.to_container(OmegaConf.load(CONF / "nnunet.yaml"))
    partial = augmentation_settings({"spatial": {"enabled": False}})
    assert partial.spatial.enabled is False
    assert partial.spatial.rotation_prob == augmentation_settings().spatial.rotation_prob

    def edit(nnunet):
        nnunet.noise_blur.blur_sigma = [1.5, 2.5]

    edited = conf_copy(tmp_path, edit)
    monkeypatch.setattr(settings, "config_dir", lambda: edited)
    # no second copy of the values in the code: a changed nnunet.yaml is what a partial config gets
    assert augmentation_settings({"spatial": {"enabled": False}}).noise_blur.blur_sigma == [1.5, 2.5]


def test_wrong_unknown_and_missing_keys_are_errors_naming_them(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"augmentation\.spatial\.rotation_probability.*expected one of.*'rotation_prob'"):
        augmentation_settings({"spatial": {"rotation_probability": 0.5}})
    with pytest.raises(ValueError, match=r"augmentation\.mirroring"):
        augmentation_settings({"mirroring": {"enabled": False}})
    with pytest.raises(ValueError, match=r"augmentation\.gamma\.prob"):
        augmentation_settings({"gamma": {"prob": "often"}})
    with pytest.raises(ValueError, match=r"augmentation\.defaults.*compose"):
        augmentation_settings(OmegaConf.load(CONF / "light.yaml"))

    def edit(nnunet):
        del nnunet.lowres["zoom_range"]

    edited = conf_copy(tmp_path, edit)
    monkeypatch.setattr(settings, "config_dir", lambda: edited)
    with pytest.raises(ValueError, match=r"augmentation\.lowres\.zoom_range"):
        augmentation_settings(None)


def test_region_size_covers_rotation_and_scaling():
    assert spatial_region_size(PATCH) == spatial_region_size(PATCH, (0, 0, 0), (0.7, 1.0)) != PATCH  # +1 voxel margin
    in_plane = spatial_region_size(PATCH, (30, 0, 0), (1.0, 1.0))
    full = spatial_region_size(PATCH, (30, 30, 30), (0.7, 1.4))
    assert all(f >= i >= p for f, i, p in zip(full, in_plane, PATCH))
    assert in_plane[0] == spatial_region_size(PATCH)[0]  # rotating about z leaves z alone
    assert all((r - p) % 2 == 0 for r, p in zip(full, PATCH))
    assert augmentation_region_size({"spatial": {"enabled": False}}, PATCH) == PATCH
    assert augmentation_region_size(compose_augmentation("none"), PATCH) == PATCH


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


@pytest.mark.parametrize("cfg", [only(None), {g: {"enabled": True, **NEVER[g]} for g in GROUPS}, "none"],
                         ids=["all_off", "all_p0", "none_yaml"])
def test_without_augmentation_the_output_is_the_centre_crop(cfg):
    if cfg == "none":
        cfg = compose_augmentation("none")
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
    transform = RandSpatialNNUNetd(["image", "label"], PATCH, rotation_prob=1.0, rotation_range_deg=(0, 0, 0))
    transform.set_random_state(seed=0)
    out = transform({"image": image, "label": label})
    assert transform.spatial.matrix is not None  # the resampling path ran, not the crop shortcut
    torch.testing.assert_close(out["image"], centre_crop(image), atol=1e-4, rtol=0)
    assert torch.equal(out["label"], centre_crop(label))


def test_rotation_moves_image_and_label_alike():
    region = spatial_region_size(PATCH, (30, 30, 30))
    _, label = make_region(region)
    image = label.float()
    transform = RandSpatialNNUNetd(["image", "label"], PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30))
    transform.set_random_state(seed=3)
    out = transform({"image": image, "label": label})
    assert not torch.equal(out["label"], centre_crop(label))
    assert (out["image"].round().to(torch.int8) == out["label"]).float().mean() > 0.95


def test_in_plane_rotation_keeps_slices_apart():
    # A label that differs only along z must not change under rotation about the z axis.
    region = spatial_region_size(PATCH, (30, 0, 0))
    label = torch.zeros((1, *region), dtype=torch.int8)
    label[0, region[0] // 2:] = 1
    transform = RandSpatialNNUNetd(["label"], PATCH, rotation_prob=1.0, rotation_range_deg=(30, 0, 0), mode="nearest")
    transform.set_random_state(seed=0)
    assert torch.equal(transform({"label": label})["label"], centre_crop(label))


def test_scaling_above_one_shrinks_objects():
    region = spatial_region_size(PATCH, scaling_range=(2.0, 2.0))
    _, label = make_region(region)
    transform = RandSpatialNNUNetd(["label"], PATCH, scaling_prob=1.0, scaling_range=(2.0, 2.0), mode="nearest")
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


# ---- MONAI style: array and dictionary versions ---------------------------------------------------------


def _blur():
    return RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=1.0)


ARRAY_AND_DICT = {
    "spatial": (lambda: RandSpatialNNUNet(PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30), scaling_prob=1.0,
                                          scaling_range=(0.7, 1.4)),
                lambda: RandSpatialNNUNetd("image", PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30),
                                           scaling_prob=1.0, scaling_range=(0.7, 1.4), mode="bilinear")),
    "noise": (lambda: RandGaussianNoiseVariance(prob=1.0, variance_range=(0.0, 0.1)),
              lambda: RandGaussianNoiseVarianced("image", prob=1.0, variance_range=(0.0, 0.1))),
    "blur_per_channel": (lambda: RandPerChannel(_blur(), prob=1.0, prob_per_channel=0.5),
                         lambda: RandPerChanneld("image", _blur(), prob=1.0, prob_per_channel=0.5)),
    "lowres_per_channel": (lambda: RandPerChannel(RandSimulateLowResolution(prob=1.0, zoom_range=(0.3, 0.9)),
                                                  prob=1.0, prob_per_channel=1.0),
                           lambda: RandPerChanneld("image", RandSimulateLowResolution(prob=1.0, zoom_range=(0.3, 0.9)),
                                                   prob=1.0, prob_per_channel=1.0)),
}


@pytest.mark.parametrize("name", ARRAY_AND_DICT)
def test_array_transforms_act_alone_and_their_dictionary_versions_repeat_with_a_seed(name):
    make_array, make_dict = ARRAY_AND_DICT[name]
    image, _ = make_region(spatial_region_size(PATCH, (30, 30, 30), (0.7, 1.4)), channels=3)
    crop_only = name == "spatial"
    source = image if crop_only else centre_crop(image)
    array = make_array()
    array.set_random_state(seed=1)
    out = array(source.clone())
    assert out.shape == (3, *PATCH) and torch.isfinite(torch.as_tensor(out)).all()
    assert not torch.allclose(torch.as_tensor(out), centre_crop(image))
    dictionary = make_dict()
    results = []
    for seed in (1, 1, 2):
        dictionary.set_random_state(seed=seed)
        results.append(torch.as_tensor(dictionary({"image": source.clone(), "other": "kept"})["image"]))
    assert results[0].shape == (3, *PATCH)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_the_spatial_array_transform_moves_a_label_exactly_as_its_image():
    region = spatial_region_size(PATCH, (30, 30, 30), (0.7, 1.4))
    image, label = make_region(region)
    spatial = RandSpatialNNUNet(PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30), scaling_prob=1.0,
                                scaling_range=(0.7, 1.4))
    spatial.set_random_state(seed=4)
    moved_image = spatial(image)
    moved_label = spatial(label, mode="nearest", randomize=False)
    pair = RandSpatialNNUNetd(["image", "label"], PATCH, rotation_prob=1.0, rotation_range_deg=(30, 30, 30),
                              scaling_prob=1.0, scaling_range=(0.7, 1.4))
    pair.set_random_state(seed=4)
    out = pair({"image": image, "label": label})
    assert torch.equal(out["image"], moved_image) and torch.equal(out["label"], moved_label)
    assert moved_label.dtype == label.dtype


# ---- MONAI transforms from the config ----------------------------------------------------------------

SHIFT = ("+augmentation.extra_transforms.shift={_target_: monai.transforms.ShiftIntensityd, keys: [image], "
         "offset: 100.0}")
NOISE = ("+augmentation.extra_transforms.noise={_target_: monai.transforms.RandGaussianNoised, keys: [image], "
         "prob: 1.0, std: 0.5, sample_std: false}")


def test_a_monai_transform_from_the_config_runs_after_ours():
    cfg = compose_augmentation("none", SHIFT)
    image, label = make_region((10, 18, 20))
    out = run(cfg, image, label)
    assert torch.equal(out["image"], centre_crop(image) + 100.0)
    assert torch.equal(out["label"], centre_crop(label).to(torch.uint8))
    assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32


def test_random_monai_transforms_from_the_config_are_seeded_with_ours():
    cfg = compose_augmentation("nnunet", NOISE)
    image, label = make_region(augmentation_region_size(cfg, PATCH))
    first, again, other = run(cfg, image, label, seed=3), run(cfg, image, label, seed=3), run(cfg, image, label, seed=4)
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"], other["image"])
    quiet = run(compose_augmentation("nnunet"), image, label, seed=3)
    assert (first["image"] - quiet["image"]).std() > 0.3  # the MONAI noise (std 0.5) was added


def test_extra_transforms_can_be_dropped_and_must_name_a_target():
    cfg = compose_augmentation("none", SHIFT, "augmentation.extra_transforms.shift=null")
    image, label = make_region((10, 18, 20))
    assert torch.equal(run(cfg, image, label)["image"], centre_crop(image))
    with pytest.raises(ValueError, match=r"extra_transforms\.shift: expected a node with _target_"):
        build_augmentation({"extra_transforms": {"shift": {"keys": ["image"]}}}, PATCH)
    with pytest.raises(TypeError, match=r"extra_transforms\.shift: builtins\.float built a float"):
        build_augmentation({"extra_transforms": {"shift": {"_target_": "builtins.float", "_args_": [1]}}}, PATCH)


EXPERIMENTS = sorted(p.stem for p in (CONF_ROOT / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[f"experiment={name}"] for name in EXPERIMENTS] + [["debug=overfit"]],
                         ids=lambda o: o[0])
def test_every_run_config_has_valid_augmentation_and_sampling_settings(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_ROOT), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    composed = OmegaConf.to_container(cfg.augmentation, resolve=True)
    assert asdict(augmentation_settings(cfg.augmentation)) == composed  # complete: nothing came from elsewhere
    assert asdict(sampling_settings(cfg.data.sampling)) == OmegaConf.to_container(cfg.data.sampling)
