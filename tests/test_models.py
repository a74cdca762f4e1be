"""Slim detectors against stock detectron2: width-1.0 equivalence, checkpoints, sizes."""
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

import slim_det
from slim_det.analysis import active_parameter_count
from tests.helpers import build, calibrate_bn_, images, shrink_, slim_cfg, stock_cfg, to_slim_

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _assert_same_instances(a, b):
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    for field in ("pred_masks", "pred_keypoints"):
        if a.has(field):
            torch.testing.assert_close(a.get(field), b.get(field), rtol=0, atol=0)


@pytest.mark.parametrize("task", ["faster", "mask", "keypoint"])
def test_stock_r50_fpn_checkpoint_gives_identical_outputs_at_width_1(task, tmp_path):
    torch.manual_seed(0)
    inputs = images(1, size=128)
    stock = calibrate_bn_(build(stock_cfg(task)), inputs)
    path = tmp_path / "stock.pth"
    torch.save({"model": stock.state_dict()}, path)
    for scope in ("backbone", "all"):
        slim = build(to_slim_(stock_cfg(task), scope))
        DetectionCheckpointer(slim).load(str(path))
        with torch.no_grad():
            _assert_same_instances(stock(inputs)[0]["instances"], slim(inputs)[0]["instances"])


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "SyncBN", "GN"])
def test_every_norm_loads_from_stock_and_slices_private_norms(norm, tmp_path):
    torch.manual_seed(0)
    inputs = images(1, size=96)
    stock_c = shrink_(stock_cfg("mask", norm=norm))
    stock_c.MODEL.FPN.NORM = norm
    if norm == "GN":  # detectron2's GN has 32 groups: every layer needs a multiple of 32 channels
        stock_c.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
        stock_c.MODEL.RESNETS.WIDTH_PER_GROUP = 32
        stock_c.MODEL.RESNETS.RES2_OUT_CHANNELS = 128
    stock = build(stock_c)
    if norm in ("BN", "SyncBN"):
        calibrate_bn_(stock, inputs)
    torch.save({"model": stock.state_dict()}, tmp_path / "stock.pth")
    slim = build(to_slim_(stock_c.clone()))
    DetectionCheckpointer(slim).load(str(tmp_path / "stock.pth"))
    with torch.no_grad():
        _assert_same_instances(stock(inputs)[0]["instances"], slim(inputs)[0]["instances"])
        for width in WIDTHS:
            slim_det.set_width(slim, width)
            assert len(slim(inputs)[0]["instances"]) > 0
    norm_layer = slim.backbone.bottom_up.res3[0].conv1.norm
    if norm != "GN":
        full = stock.backbone.bottom_up.res3[0].conv1.norm
        torch.testing.assert_close(norm_layer.private["w0_5"].weight, full.weight[:16])
        assert norm_layer.private["w0_5"].running_var.shape == (16,)


def test_imagenet_r50_format_loads_with_matching_heuristics(tmp_path):
    """detectron2's converted ImageNet R-50 (.pkl, numpy, trunk-relative names) fills every width."""
    cfg = slim_cfg("faster", tiny=False, norm="FrozenBN")
    torch.manual_seed(0)
    trunk = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    state = {k: v.numpy() for k, v in trunk.state_dict().items()}
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    slim = build(cfg)
    DetectionCheckpointer(slim).load(str(tmp_path / "R-50.pkl"))
    bottom_up = slim.backbone.bottom_up.state_dict()
    for key, value in state.items():
        assert torch.equal(bottom_up[key], torch.as_tensor(value)), key
    torch.testing.assert_close(
        bottom_up["res4.2.conv2.norm.private.w0_25.running_var"],
        torch.as_tensor(state["res4.2.conv2.norm.running_var"][:64]),
    )


def test_slim_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    inputs = images(1)
    slim = calibrate_bn_(build(slim_cfg("keypoint", scope="all")), inputs, WIDTHS)
    DetectionCheckpointer(slim, save_dir=str(tmp_path)).save("slim")
    again = build(slim_cfg("keypoint", scope="all"))
    DetectionCheckpointer(again).load(str(tmp_path / "slim.pth"))
    a, b = slim.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        for width in WIDTHS:
            slim_det.set_width(slim, width)
            slim_det.set_width(again, width)
            _assert_same_instances(slim(inputs)[0]["instances"], again(inputs)[0]["instances"])


def _plain_cfg_at(width, scope, fpn_min_width=0.0):
    """A stock detectron2 config with the channel counts of the tiny slim model at ``width``."""
    c = lambda n: slim_det.active_channels(n, width, 4)  # noqa: E731
    cfg = shrink_(stock_cfg("mask"))
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = c(16)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = c(64)
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = c(16)
    if scope == "all":
        cfg.MODEL.FPN.OUT_CHANNELS = slim_det.active_channels(32, max(width, fpn_min_width), 4)
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = c(64)
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = c(16)
    return cfg


@pytest.mark.parametrize("scope, fpn_min_width", [("backbone", 0.0), ("all", 0.0), ("all", 0.5)])
def test_parameter_counts_and_fpn_shapes_per_width(scope, fpn_min_width):
    torch.manual_seed(0)
    inputs = images(1, size=128)
    cfg = slim_cfg("mask", scope=scope)
    cfg.MODEL.SLIM.FPN_MIN_WIDTH = fpn_min_width
    slim = calibrate_bn_(build(cfg), inputs, WIDTHS)
    batch = slim.preprocess_image(inputs).tensor
    for width in WIDTHS:
        plain = build(_plain_cfg_at(width, scope, fpn_min_width))
        slim_det.set_width(slim, width)
        assert active_parameter_count(slim, inputs) == sum(p.numel() for p in plain.parameters())
        with torch.no_grad():
            features = slim.backbone(batch)
        fpn_width = max(width, fpn_min_width)
        expected = slim_det.active_channels(32, fpn_width, 4) if scope == "all" else 32
        assert sorted(features) == ["p2", "p3", "p4", "p5", "p6"]
        for name, stride in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64]):
            assert features[name].shape == (1, expected, 128 // stride, 128 // stride)


def test_bn_frozen_by_freeze_at_becomes_switchable_frozen_bn():
    """FREEZE_AT converts the first stages' BN to FrozenBN before slimming; both kinds switch."""
    cfg = slim_cfg("faster", norm="BN")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build(cfg)
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    assert type(stem_norm).__name__ == "SwitchableFrozenBatchNorm2d"
    assert type(model.backbone.bottom_up.res3[0].conv1.norm).__name__ == "SwitchableBatchNorm2d"
    assert not model.backbone.bottom_up.res2[0].conv1.weight.requires_grad
    batch = model.preprocess_image(images(1)).tensor
    with torch.no_grad():
        for width in WIDTHS:
            slim_det.set_width(model, width)
            features = model.backbone(batch)["p2"]
            assert features.shape[1] == 32 and torch.isfinite(features).all()
