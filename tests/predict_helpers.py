"""Shared by the predictor tests: tiny plans and checkpoints, a voxel-wise stub network, test images,
and predict.py composed or run in-process."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from pancreas_mtl.raw.io import write_nifti
from pancreas_mtl.inference.predictor import InferenceSettings
from pancreas_mtl.models.multitask import build_model
from pancreas_mtl.planning.plan import ChannelNormalization, Plan
from tests.conftest import REPO_ROOT, SHARED_CT, lps_affine, make_case_arrays

CONF = REPO_ROOT / "conf"


def tiny_plan(target_spacing=(2.0, 0.8, 0.8), patch=(8, 16, 16), **changes) -> Plan:
    """A two-stage plan (divisor 2) with CT normalisation: clip [-100, 200] HU, mean 50, std 50."""
    values = dict(preset="tiny-test", target_spacing=tuple(target_spacing), median_shape=(12, 28, 36),
                  patch_size=tuple(patch), batch_size=2,
                  normalization=[ChannelNormalization("ct", -100.0, 200.0, 50.0, 50.0)],
                  kernel_sizes=[(3, 3, 3), (3, 3, 3)], strides=[(1, 1, 1), (2, 2, 2)], features_per_stage=[4, 8],
                  n_blocks_per_stage=[1, 1], n_conv_per_stage_decoder=[1])
    values.update(changes)
    return Plan(**values)


def save_checkpoint(path: Path, plan: Plan, seed: int = 0, seg_bias=None, class_bias=None) -> Path:
    """A training-checkpoint-shaped file for a tiny MultiTaskNet; with ``seg_bias`` / ``class_bias`` the
    segmentation / class logits are those constants everywhere (weights of the last layers zeroed)."""
    torch.manual_seed(seed)
    model_cfg = {"backbone": OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/resenc.yaml")),
                 "head": OmegaConf.to_container(OmegaConf.load(CONF / "model/head/single_stage.yaml"))}
    network = build_model(model_cfg, plan)
    with torch.no_grad():
        if seg_bias is not None:
            for head in network.backbone.seg_heads:
                head.weight.zero_()
                head.bias.copy_(torch.tensor(seg_bias))
        if class_bias is not None:
            network.head.classifier[-1].weight.zero_()
            network.head.classifier[-1].bias.copy_(torch.tensor(class_bias))
    torch.save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
                "pancreas_mtl": {"plan": plan.to_dict(), "config": {"model": model_cfg}}}, path)
    return path


class Pointwise(nn.Module):
    """A stub network that labels by intensity, voxel by voxel: logits (0, x, 2x - 2) of the normalised
    image x, so pancreas where 0 < x <= 2 (50 < HU <= 150) and lesion where x > 2 (HU > 150); class
    probabilities from the window's mean. It commutes with flips and with any tiling."""

    def forward(self, windows):
        x = windows[:, :1]
        seg = torch.cat([torch.zeros_like(x), x, 2 * x - 2], dim=1)
        mean = windows.mean(dim=(1, 2, 3, 4))
        return seg, torch.stack([mean, -mean, torch.zeros_like(mean)], dim=1).softmax(dim=1)


def expected_labels(hu: np.ndarray) -> np.ndarray:
    return np.where(hu > 150, 2, np.where(hu > 50, 1, 0)).astype(np.uint8)


def boxes_image(shape=(20, 40, 48), border=2) -> np.ndarray:
    """int16 HU: -100 background, a 100 HU box off the centre with a 180 HU box inside it (a flipped or
    transposed axis would move them), and zero slabs at the low z and x borders (cropped off)."""
    hu = np.full(shape, -100, dtype=np.int16)
    z, y, x = shape
    hu[z // 5:3 * z // 5, y // 6:y // 2, x // 4:2 * x // 3] = 100
    hu[z // 4:z // 2, y // 4:5 * y // 12, x // 3:x // 2] = 180
    hu[:, :, :border] = 0
    hu[:border] = 0
    return hu


def ras_example(folder: Path, content: np.ndarray | None = None) -> Path:
    """The real RAS CT (3 mm) with zeroed slabs at the high x and z borders (so cropping matters), its
    header and affine kept; ``content`` (Z, Y, X) replaces the voxels."""
    source = nib.load(str(SHARED_CT / "example_ct_sm.nii.gz"))
    data = np.asanyarray(source.dataobj).copy() if content is None else content.transpose(2, 1, 0).copy()
    data[-3:] = 0        # x
    data[:, :, -2:] = 0  # z
    path = folder / "example_ct_sm.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, source.affine, source.header), str(path))
    return path


def settings(**changes) -> InferenceSettings:
    """``fast``'s windows (step 0.75, no mirroring) with ``changes``; every other key is accurate's."""
    return InferenceSettings.from_config({"name": "test", "overlap": 0.25, "mirror_axes": [], **changes})


def write_cases(folder: Path, count: int = 3, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for number in range(1, count + 1):
        image, mask = make_case_arrays(rng, shape_zyx=(10, 24, 28))
        write_nifti(image, lps_affine(), folder / f"quiz_{number:03d}_0000.nii.gz")
        write_nifti(mask, lps_affine(), folder / f"quiz_{number:03d}.nii.gz")  # masks beside images are ignored
        names.append(f"quiz_{number:03d}")
    return names


def compose_predict(overrides: list[str]):
    """predict.yaml with ``overrides``; the engines' disk cache off unless an override names one (tests must
    not write into the repository's outputs/)."""
    GlobalHydra.instance().clear()
    cache = [] if any(o.startswith("engine_cache=") for o in overrides) else ["engine_cache=null"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("predict", overrides=["progress=false", "device=cpu", "prefetch=true", *cache, *overrides])


def run_predict(overrides: list[str]):
    from pancreas_mtl.commands.predict import predict

    return predict(compose_predict(overrides))
