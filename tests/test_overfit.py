"""The small preset learns: on a few synthetic cases it overfits segmentation and subtype in bounded steps."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.dataset.sampling import read_region
from pancreas_mtl.evaluation.metrics import whole_pancreas_dice
from pancreas_mtl.losses import ClassificationLoss, MultiTaskLoss, SegmentationLoss
from pancreas_mtl.models import build_model
from pancreas_mtl.planning.planner import load_preset
from tests.conf_values import classification_loss_values, segmentation_loss_values
from tests.conftest import REPO_ROOT

CASES_PER_SUBTYPE = 2
MAX_STEPS = 300


def _whole_case_batch(prepared, case_ids, patch_size):
    """Each case centred in one patch (cases are smaller than the patch at this spacing)."""
    images, labels, subtypes = [], [], []
    for case in prepared.cached(case_ids):
        image, seg = case.load_image(), case.load_seg()
        start = [(s - p) // 2 for s, p in zip(image.shape[1:], patch_size)]
        images.append(np.stack([read_region(channel, start, patch_size) for channel in image]))
        labels.append(read_region(seg, start, patch_size)[None])
        subtypes.append(case.subtype)
    return (torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(labels).astype(np.int64)),
            torch.tensor(subtypes))


@pytest.mark.slow
def test_small_preset_overfits_segmentation_and_subtype(tmp_path):
    torch.manual_seed(0)
    data = {"root": str(tmp_path / "synthetic_tiny"), "synthetic": {"size": "tiny", "seed": 0},
            "cache_dir": str(tmp_path / "cache"), "preprocessing_workers": 0, "progress": False}
    prepared = prepare_dataset(data, {**load_preset("small"), "spacing_scale": 2.0}, progress=False)
    by_subtype = {s: [c for c in prepared.split.train if prepared.cases[c].subtype == s] for s in range(3)}
    case_ids = [c for s in range(3) for c in by_subtype[s][:CASES_PER_SUBTYPE]]
    plan = prepared.plan
    image, label, subtype = _whole_case_batch(prepared, case_ids, plan.patch_size)
    model_cfg = OmegaConf.load(REPO_ROOT / "conf" / "model" / "default.yaml")
    model_cfg.backbone = OmegaConf.load(REPO_ROOT / "conf" / "model" / "backbone" / "resenc.yaml")
    model_cfg.head = OmegaConf.load(REPO_ROOT / "conf" / "model" / "head" / "multistage.yaml")
    model_cfg.head.dropout = 0.0
    del model_cfg["defaults"]
    model = build_model(model_cfg, plan)
    loss = MultiTaskLoss(SegmentationLoss(**segmentation_loss_values()),
                         ClassificationLoss(**classification_loss_values(class_weights=None)), cls_weight=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    has_lesion = (label == 2).flatten(1).any(1)
    assert has_lesion.all()

    def scores():
        model.eval()
        with torch.no_grad():
            seg_logits, class_logits = model(image)
        model.train()
        predicted = seg_logits[0].argmax(1)
        dice = np.mean([whole_pancreas_dice(p.numpy(), t[0].numpy()) for p, t in zip(predicted, label)])
        return float(dice), float((class_logits.argmax(1) == subtype).float().mean())

    for step in range(1, MAX_STEPS + 1):
        seg_logits, class_logits = model(image)
        terms = loss(seg_logits, class_logits, label, subtype)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        if step % 25 == 0:
            dice, accuracy = scores()
            if dice > 0.8 and accuracy == 1.0:
                break
    assert dice > 0.8, f"whole-pancreas Dice {dice:.3f} after {step} steps"
    assert accuracy == 1.0, f"training subtype accuracy {accuracy:.2f} after {step} steps"
