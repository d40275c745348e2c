"""Warm starts (pretrained=PATH): every kind of source loads by name and shape, a changed input channel or
label count re-initialises only the layers it touches, anything else that does not fit is refused naming
its tensors, bad paths say what was found, and the fine-tuning controls act on the optimizer.

nnU-Net's files are made with nnU-Net's own network classes (dynamic-network-architectures) and its
checkpoint layout, never imitated by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pancreas_mtl.config import expand_shorthands
from pancreas_mtl.files import sha256
from pancreas_mtl.models.multitask import build_model
from pancreas_mtl.models.nnunet_plans import nnunet_dataset_json, nnunet_plans
from pancreas_mtl.training.fine_tuning import FineTuning, FreezeEncoder, parameter_groups, scale_learning_rates
from pancreas_mtl.training.pretrained_sources import (
    NNUNET_CHECKPOINT,
    NNUNET_MODEL_FOLDER,
    OUR_CHECKPOINT,
    OUR_STATE_DICT,
    PretrainedSourceError,
    read_pretrained,
)
from pancreas_mtl.training.warm_start import PretrainedMismatchError, match, part_of, warm_start, write_report
from tests.conf_values import _composed
from tests.test_models import tiny_plan

pytest.importorskip("dynamic_network_architectures")

from tests.test_nnunet_parity import nnunet_network, randomize_  # noqa: E402  (needs dynamic-network-architectures)


def model_config(head: str = "single_stage", backbone: str = "resenc") -> dict:
    """conf/model composed for a head and backbone, as train.py builds it."""
    return _composed((f"model/head={head}", f"model/backbone={backbone}"))["model"]


def network(plan=None, seed: int = 0, head: str = "single_stage", backbone: str = "resenc"):
    torch.manual_seed(seed)
    return build_model(model_config(head, backbone), plan or tiny_plan())


def our_checkpoint(path: Path, net, plan, head: str = "single_stage") -> Path:
    """A file in the layout MultiTaskModule.on_save_checkpoint writes (the end-to-end test below trains one)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "pancreas_mtl": {"plan": plan.to_dict(), "config": {"model": model_config(head)}}}, path)
    return path


def nnunet_model_folder(folder: Path, source_net, plan, fold: int = 0, num_classes: int | None = None,
                        seed: int = 5) -> torch.nn.Module:
    """An nnU-Net v2 training output: plans.json and dataset.json for ``plan``, and fold_X/checkpoint_final.pth
    as nnUNetTrainer.save_checkpoint writes it, holding the state dict of dynamic-network-architectures'
    network (randomised); ``num_classes`` another label count than the plan's. Returns their network."""
    plans = nnunet_plans(source_net.backbone, plan)
    dataset_json = nnunet_dataset_json(plan)
    if num_classes is not None:
        dataset_json["labels"] = {"background": 0, **{f"organ{i}": i for i in range(1, num_classes)}}
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    theirs = nnunet_network(architecture, plan.num_input_channels, len(dataset_json["labels"]), True)
    randomize_(theirs, seed=seed)
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    checkpoint = {"network_weights": theirs.state_dict(), "optimizer_state": optimizer.state_dict(),
                  "grad_scaler_state": None, "current_epoch": 1000, "_best_ema": 0.5,
                  "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                                "dataset_json": dataset_json},
                  "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    (folder / f"fold_{fold}").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return theirs


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# --- each kind of source ---------------------------------------------------------------------------------

def test_our_checkpoint_loads_the_encoder_and_decoder_and_leaves_the_outputs_and_head(tmp_path):
    plan = tiny_plan()
    source_net = network(plan, seed=1)
    path = our_checkpoint(tmp_path / "source.ckpt", source_net, plan)
    source = read_pretrained(path, 0, "checkpoint_final.pth")
    assert source.format == OUR_CHECKPOINT and source.plan == plan
    target = network(plan, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = warm_start(target, source, "encoder_decoder")
    for key, value in target.state_dict().items():
        expected = source_net.state_dict()[key] if part_of(key) in ("encoder", "decoder") else fresh[key]
        assert same(value, expected), key
    assert result.loaded_names == {k for k in fresh if part_of(k) in ("encoder", "decoder")}
    skipped = {entry["name"]: entry["reason"] for entry in result.skipped}
    assert skipped["backbone.seg_heads.0.weight"].startswith("not in pretrained.parts=encoder_decoder")
    assert any(name.startswith("head.") for name in skipped)
    report = write_report(result, tmp_path)
    content = json.loads(report.read_text())
    assert content["sha256"] == sha256(path) and content["source_format"] == OUR_CHECKPOINT
    assert content["counts"] == {"loaded": len(result.loaded), "reinitialised": 0, "skipped": len(result.skipped)}


@pytest.mark.parametrize("parts, loaded_parts", [("encoder", {"encoder"}),
                                                 ("backbone", {"encoder", "decoder", "seg_outputs"}),
                                                 ("all", {"encoder", "decoder", "seg_outputs", "head"})])
def test_parts_select_what_is_loaded(tmp_path, parts, loaded_parts):
    plan = tiny_plan()
    source = read_pretrained(our_checkpoint(tmp_path / "s.ckpt", network(plan, seed=1), plan), 0, "")
    result = warm_start(network(plan, seed=2), source, parts)
    assert {part_of(name) for name in result.loaded_names} == loaded_parts


@pytest.mark.parametrize("layout", ["multitask", "backbone", "lightning", "ddp"])
def test_a_plain_state_dict_of_our_network_loads(tmp_path, layout):
    plan = tiny_plan()
    source_net = network(plan, seed=1)
    state = {"multitask": source_net.state_dict(), "backbone": source_net.backbone.state_dict(),
             "lightning": {"state_dict": {f"model.{k}": v for k, v in source_net.state_dict().items()}},
             "ddp": {f"module.{k}": v for k, v in source_net.state_dict().items()}}[layout]
    torch.save(state, tmp_path / "weights.pt")
    source = read_pretrained(tmp_path / "weights.pt", 0, "")
    assert source.format == OUR_STATE_DICT and source.plan is None
    target = network(plan, seed=2)
    warm_start(target, source, "backbone")
    assert same(target.backbone.stem.conv.weight, source_net.backbone.stem.conv.weight)
    assert same(target.backbone.seg_heads[0].bias, source_net.backbone.seg_heads[0].bias)


@pytest.mark.engines  # the export writes ONNX and checks it with ONNX Runtime: in a forked child (tests/forked.py)
def test_an_exported_model_folder_loads_its_weights(tmp_path):
    from pancreas_mtl.inference.model_folder import export_model_folder

    plan = tiny_plan()
    source_net = network(plan, seed=1)
    checkpoint = our_checkpoint(tmp_path / "s.ckpt", source_net, plan)
    folder = export_model_folder(checkpoint, source_net, plan, tmp_path / "exported", engine="onnxruntime",
                                 precision="fp32", verify=False)
    source = read_pretrained(folder, 0, "")
    assert source.plan == plan and source.file == folder / "weights.pt"
    target = network(plan, seed=2)
    warm_start(target, source, "all")
    assert all(same(v, source_net.state_dict()[k]) for k, v in target.state_dict().items())


def test_an_nnunet_model_folder_loads_by_nnunets_names_with_another_label_count(tmp_path):
    plan = tiny_plan()
    folder = tmp_path / "Dataset009_Spleen" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    theirs = nnunet_model_folder(folder, network(plan), plan, num_classes=5)
    source = read_pretrained(folder, 0, "checkpoint_final.pth")
    assert source.format == NNUNET_MODEL_FOLDER and source.plan.num_classes == 5
    target = network(plan, seed=2)
    fresh_heads = [h.weight.clone() for h in target.backbone.seg_heads]
    result = warm_start(target, source, "backbone")
    assert same(target.backbone.stem.conv.weight, theirs.state_dict()["encoder.stem.convs.0.conv.weight"])
    assert same(target.backbone.decoder[0].upsample.weight, theirs.state_dict()["decoder.transpconvs.0.weight"])
    # 5 labels there, 3 here: the outputs keep their fresh initialisation, reported with the reason
    assert all(same(h.weight, w) for h, w in zip(target.backbone.seg_heads, fresh_heads))
    reasons = {entry["name"]: entry["reason"] for entry in result.reinitialised}
    assert reasons["backbone.seg_heads.0.weight"] == "labels: 5 in the source, 3 here"
    assert set(reasons) == {f"backbone.seg_heads.{i}.{p}" for i in range(len(fresh_heads)) for p in ("weight", "bias")}
    # nnU-Net's second copies of the encoder (decoder.encoder.*) count as used, not as unknown tensors
    assert not [e for e in result.skipped if e["name"] is None and "encoder" in e["source_name"]]


def test_an_nnunet_checkpoint_file_loads_and_carries_its_plan(tmp_path):
    plan = tiny_plan()
    theirs = nnunet_model_folder(tmp_path / "model", network(plan), plan)
    source = read_pretrained(tmp_path / "model" / "fold_0" / "checkpoint_final.pth", 0, "")
    assert source.format == NNUNET_CHECKPOINT and source.plan.patch_size == plan.patch_size
    target = network(plan, seed=3)
    warm_start(target, source, "encoder")
    assert same(target.backbone.encoder[1][0].conv1.conv.weight,
                theirs.state_dict()["encoder.stages.1.blocks.0.conv1.conv.weight"])


def test_another_input_channel_count_reinitialises_only_the_first_convolution(tmp_path):
    plan = tiny_plan()
    two_channels = tiny_plan()
    two_channels.num_input_channels = 2
    two_channels.normalization = two_channels.normalization * 2
    source_net = network(plan, seed=1)
    source = read_pretrained(our_checkpoint(tmp_path / "s.ckpt", source_net, plan), 0, "")
    target = network(two_channels, seed=2)
    fresh = target.backbone.stem.conv.weight.clone()
    result = warm_start(target, source, "encoder_decoder")
    assert same(target.backbone.stem.conv.weight, fresh)
    assert [(e["name"], e["reason"]) for e in result.reinitialised] == [
        ("backbone.stem.conv.weight", "input channels: 1 in the source, 2 here")]
    assert same(target.backbone.stem.conv.bias, source_net.backbone.stem.conv.bias)


# --- refusals ------------------------------------------------------------------------------------------

def test_a_source_of_another_topology_is_refused_naming_its_tensors_and_nothing_is_loaded(tmp_path):
    source_plan, plan = tiny_plan(features=(4, 8, 16, 16)), tiny_plan(features=(4, 8, 16, 32))
    source = read_pretrained(our_checkpoint(tmp_path / "s.ckpt", network(source_plan, seed=1), source_plan), 0, "")
    target = network(plan, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PretrainedMismatchError, match=r"of another shape.*backbone\.encoder\.3\.0\.conv1\.conv\.weight"
                       r" \[32, 16, 3, 3, 3\] <- backbone\.encoder\.3\.0\.conv1\.conv\.weight \[16, 16, 3, 3, 3\]"
                       r"(.|\n)*planning=from_pretrained"):
        warm_start(target, source, "encoder_decoder")
    assert all(same(v, before[k]) for k, v in target.state_dict().items())


def test_a_source_with_more_stages_is_refused_naming_the_extra_tensors(tmp_path):
    plan, deeper = tiny_plan(features=(4, 8, 16)), tiny_plan(features=(4, 8, 16, 16))
    source = read_pretrained(our_checkpoint(tmp_path / "s.ckpt", network(deeper, seed=1), deeper), 0, "")
    with pytest.raises(PretrainedMismatchError, match=r"in the source but not in this network: "
                                                      r"backbone\.encoder\.3\.0\.conv1\.conv\.bias"):
        match(network(plan), source, "encoder")


def test_parts_all_from_a_source_without_a_head_says_to_use_backbone(tmp_path):
    plan = tiny_plan()
    nnunet_model_folder(tmp_path / "model", network(plan), plan)
    source = read_pretrained(tmp_path / "model", 0, "checkpoint_final.pth")
    with pytest.raises(PretrainedMismatchError, match=r"missing from the source: head\.(.|\n)*pretrained.parts=backbone"):
        match(network(plan), source, "all")


def test_bad_paths_say_what_was_found(tmp_path):
    with pytest.raises(PretrainedSourceError, match=r"not found"):
        read_pretrained(tmp_path / "nope.ckpt", 0, "")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(PretrainedSourceError, match=r"holds no \.ckpt, \.pth or \.pt file"):
        read_pretrained(tmp_path / "empty", 0, "")
    (tmp_path / "text.ckpt").write_text('{"not": "a checkpoint"}')
    with pytest.raises(PretrainedSourceError, match=r"JSON or text file"):
        read_pretrained(tmp_path / "text.ckpt", 0, "")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "other.pt")
    with pytest.raises(PretrainedSourceError, match=r"holds no weights.*found \['epoch', 'notes'\]"):
        read_pretrained(tmp_path / "other.pt", 0, "")
    plan = tiny_plan()
    nnunet_model_folder(tmp_path / "model", network(plan), plan, fold=1)
    with pytest.raises(PretrainedSourceError, match=r"no fold_0 \(pretrained.fold=0\); it holds \['fold_1'\]"):
        read_pretrained(tmp_path / "model", 0, "checkpoint_final.pth")
    with pytest.raises(PretrainedSourceError, match=r"fold_1/checkpoint_best.pth is missing.*\['checkpoint_final.pth'\]"):
        read_pretrained(tmp_path / "model", 1, "checkpoint_best.pth")


def test_a_file_holding_code_is_refused_unread(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PretrainedSourceError, match="could run code"):
        read_pretrained(tmp_path / "evil.pt", 0, "")


# --- fine-tuning controls ------------------------------------------------------------------------------

def test_lr_scale_gives_the_pretrained_layers_their_own_learning_rate(tmp_path):
    plan = tiny_plan()
    source = read_pretrained(our_checkpoint(tmp_path / "s.ckpt", network(plan, seed=1), plan), 0, "")
    target = network(plan, seed=2)
    names = warm_start(target, source, "encoder_decoder").loaded_names
    optimizer = torch.optim.SGD(parameter_groups(target, FineTuning(frozenset(names), 0.1, 0)), lr=0.01)
    scale_learning_rates(optimizer)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["pretrained"]["lr"] == pytest.approx(0.001) and groups["new"]["lr"] == 0.01
    by_id = {id(p): n for n, p in target.named_parameters()}
    assert {by_id[id(p)] for p in groups["pretrained"]["params"]} == names
    assert all(part_of(by_id[id(p)]) in ("seg_outputs", "head") for p in groups["new"]["params"])
    # no warm start: the optimizer's one group, as before
    assert len(torch.optim.SGD(parameter_groups(target, None), lr=0.01).param_groups) == 1


def test_freeze_epochs_hold_the_encoder_then_let_it_train(tmp_path):
    plan = tiny_plan()
    target = network(plan, seed=2)
    names = {n for n, _ in target.named_parameters() if part_of(n) in ("encoder", "decoder")}
    tuning = FineTuning(frozenset(names), 1.0, 1)
    assert tuning.frozen() == {n for n in names if part_of(n) == "encoder"}
    freeze = FreezeEncoder(tuning.frozen(), tuning.freeze_epochs)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)

    class Stub:  # what the callback reads of the trainer and module
        current_epoch = 0
        model = target

    def step() -> None:
        optimizer.zero_grad()
        seg, _ = target(torch.randn(2, 1, *plan.patch_size))
        seg[0].square().mean().backward()
        freeze.on_before_optimizer_step(Stub, Stub, optimizer)
        optimizer.step()

    stem, decoder = target.backbone.stem.conv.weight, target.backbone.decoder[0].upsample.weight
    stem_before, decoder_before = stem.clone(), decoder.clone()
    step()
    assert same(stem, stem_before) and not same(decoder, decoder_before)
    Stub.current_epoch = 1
    step()
    assert not same(stem, stem_before)


def test_pretrained_path_shorthand_is_written_out():
    assert expand_shorthands(["pretrained=/m/x", "pretrained.parts=all", "+pretrained=/y", "trainer=cpu",
                              "pretrained_other=1"]) == [
        "pretrained.path=/m/x", "pretrained.parts=all", "+pretrained.path=/y", "trainer=cpu", "pretrained_other=1"]


# --- planning=from_pretrained ------------------------------------------------------------------------------

def test_an_adopted_plan_refuses_what_it_cannot_take_over():
    from omegaconf import OmegaConf

    from pancreas_mtl.planning.adopted import adopt_plan
    from tests.test_models import quiz_fingerprint

    planning = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/planning/from_pretrained.yaml"))
    fingerprint = quiz_fingerprint()
    with pytest.raises(ValueError, match="holds none \\(a plain state dict\\)"):
        adopt_plan(fingerprint, None, planning, "weights.pt")
    two_channels = tiny_plan()
    two_channels.num_input_channels = 2
    with pytest.raises(ValueError, match="planned for 2 input channel\\(s\\), this dataset has 1"):
        adopt_plan(fingerprint, two_channels, planning, "model")
    with pytest.raises(ValueError, match="only patch_size and batch_size"):
        adopt_plan(fingerprint, tiny_plan(), {**planning, "overrides": {"target_spacing": [1, 1, 1]}}, "model")
    with pytest.raises(ValueError, match="not divisible by the pretrained network's strides \\[4, 8, 8\\]"):
        adopt_plan(fingerprint, tiny_plan(), {**planning, "overrides": {"patch_size": [16, 30, 32]}}, "model")
    adopted = adopt_plan(fingerprint, tiny_plan(), {**planning, "overrides": {"patch_size": [8, 32, 32]}}, "model")
    assert adopted.patch_size == (8, 32, 32) and adopted.num_subtypes == 3 and adopted.strides == tiny_plan().strides


def test_tune_composes_pretrained_for_every_trial(tmp_path):
    pytest.importorskip("optuna")
    from pancreas_mtl.training.tune import compose_tune

    cfg = compose_tune(["hparams_search=optuna", f"pretrained={tmp_path / 'm.ckpt'}", "pretrained.lr_scale=0.1",
                        f"paths.output_root={tmp_path}"])
    assert cfg.pretrained.path == str(tmp_path / "m.ckpt") and cfg.pretrained.lr_scale == 0.1
    assert cfg.pretrained.parts == "encoder_decoder"


def test_a_plainconv_nnunet_checkpoint_with_another_label_count_loads_into_the_plainconv_backbone(tmp_path):
    plan = tiny_plan()
    plan.network = "plainconv"
    source_net = network(plan, backbone="plainconv")
    theirs = nnunet_model_folder(tmp_path / "model", source_net, plan, num_classes=6)
    source = read_pretrained(tmp_path / "model", 0, "checkpoint_final.pth")
    assert source.plan.network == "plainconv" and source.plan.num_classes == 6
    target = network(plan, seed=4, backbone="plainconv")
    result = warm_start(target, source, "backbone")
    first = theirs.state_dict()["encoder.stages.0.0.convs.0.conv.weight"]
    assert same(target.backbone.encoder[0][0].conv.weight, first)
    assert {e["reason"] for e in result.reinitialised} == {"labels: 6 in the source, 3 here"}
    with pytest.raises(PretrainedMismatchError, match="model/backbone=plainconv"):
        match(network(tiny_plan()), source, "encoder")
