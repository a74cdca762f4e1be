"""Tests for the slimmable MobileNet v1 / v2 trunks, their FPN detectors and their FLOPs."""
import copy
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from fvcore.nn import FlopCountAnalysis

import slim_det
from slim_det.layers import SlimConv2d, SlimLinear, SwitchableNorm
from slim_det.modeling.mobilenet import (
    MobileNetV1,
    MobileNetV2,
    build_mobilenet_classifier,
    make_mobilenet_slimmable_,
)
from slim_det.width import make_divisible

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
WIDTHS = {1: [0.25, 0.5, 0.75, 1.0], 2: [0.35, 0.5, 0.75, 1.0]}
# Stage output channels at width 1.0; v2's res5 is the 1280-channel last conv, which never slims.
CHANNELS = {1: [128, 256, 512, 1024], 2: [24, 32, 96, 1280]}
# S-Nets Table 3, multiply-adds at 224x224 with the 1000-way classifier.
PAPER_FLOPS = {
    1: {1.0: 569e6, 0.75: 317e6, 0.5: 150e6, 0.25: 41e6},
    2: {1.0: 301e6, 0.75: 209e6, 0.5: 97e6, 0.35: 59e6},
}
FEATURES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores shared with other jobs: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(version, config="slim_mobilenet_v{}_mask_rcnn.yaml", scope="backbone"):
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, config.format(version)))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SLIM.SCOPE = scope
    return cfg


def _expected_channels(version, stage, width):
    full = CHANNELS[version][FEATURES.index(stage)]
    if version == 2 and stage == "res5":
        return full
    return full if width == 1.0 else make_divisible(full * width, 8)


def _randomize_norms(model):
    # Stock BN starts at mean 0 / var 1, which would hide a wrong mapping of running statistics.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean.data = torch.randn(n, generator=generator) * 0.1
            module.running_var.data = torch.rand(n, generator=generator) + 0.5


@pytest.mark.parametrize("version", [1, 2])
def test_trunk_shapes_at_every_width(version):
    cfg = _cfg(version)
    cfg.MODEL.MOBILENET.NORM = "BN"
    name = f"build_slim_mobilenet_v{version}_backbone"
    trunk = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3)).eval()
    shapes = trunk.output_shape()
    assert [shapes[f].stride for f in FEATURES] == [4, 8, 16, 32]
    assert [shapes[f].channels for f in FEATURES] == CHANNELS[version]
    for width in WIDTHS[version]:
        slim_det.set_width(trunk, width)
        with torch.no_grad():
            out = trunk(torch.rand(2, 3, 64, 64))
        for stage, size in zip(FEATURES, (16, 8, 4, 2)):
            expected = (2, _expected_channels(version, stage, width), size, size)
            assert tuple(out[stage].shape) == expected, (stage, width)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("scope", ["backbone", "all"])
def test_mask_rcnn_runs_at_every_width(version, scope):
    cfg = _cfg(version, scope=scope)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep boxes so masks run
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    model = build_model(cfg).eval()
    assert isinstance(model.backbone.bottom_up, MobileNetV1 if version == 1 else MobileNetV2)
    for width in WIDTHS[version]:
        slim_det.set_width(model, width)
        with torch.no_grad():
            features = model.backbone(torch.zeros(1, 3, 64, 64))
            (result,) = model([{"image": torch.rand(3, 64, 64) * 255}])
        fpn_channels = 256 if scope == "backbone" or width == 1.0 else make_divisible(256 * width)
        assert {k: tuple(v.shape) for k, v in features.items()} == {
            f"p{i}": (1, fpn_channels, 2 ** (6 - i), 2 ** (6 - i)) for i in range(2, 7)
        }
        instances = result["instances"]
        assert len(instances) == 5
        assert tuple(instances.pred_masks.shape) == (5, 64, 64)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("task", ["faster", "keypoint"])
def test_other_coco_configs_build(version, task):
    cfg = _cfg(version, f"slim_mobilenet_v{{}}_{task}_rcnn.yaml")
    assert cfg.MODEL.SLIM.WIDTHS == WIDTHS[version]
    cfg.TEST.DETECTIONS_PER_IMAGE = 5  # random weights: keep the keypoint post-processing small
    model = build_model(cfg).eval()
    slim_det.set_width(model, min(WIDTHS[version]))
    with torch.no_grad():
        model([{"image": torch.rand(3, 64, 64) * 255}])


def test_shapes_config():
    cfg = _cfg(2, os.path.join("shapes", "slim_mobilenet_v2_mask_rcnn_shapes.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_slim_mobilenet_v2_fpn_backbone"
    assert cfg.MODEL.MOBILENET.NORM == "BN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.MASK_ON and cfg.MODEL.SLIM.WIDTHS == WIDTHS[2]
    trunk = build_model(cfg).backbone.bottom_up
    assert all(p.requires_grad for p in trunk.parameters())


@pytest.mark.parametrize("version", [1, 2])
def test_flops_match_paper(version):
    model = build_mobilenet_classifier(version, WIDTHS[version]).eval()
    for width in WIDTHS[version]:
        slim_det.set_width(model, width)
        counter = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = counter.by_operator()
        # The paper counts the multiply-adds of convs and the classifier, not norms.
        flops = by_op["conv"] + by_op["linear"]
        paper = PAPER_FLOPS[version][width]
        assert abs(flops - paper) / paper < 0.05, (width, flops / 1e6)


def test_channel_rules():
    model = build_mobilenet_classifier(2, WIDTHS[2])
    slim_det.set_width(model, 0.35)
    trunk = model.trunk
    # Stem input stays 3; expanded layers use 6 x the rounded base; last conv and classifier stay.
    assert trunk.stem.conv1.active_shape(3) == (16, 3, 1)
    assert trunk.res2[0].expand.active_shape(8) == (48, 8, 1)
    assert trunk.res2[0].depthwise.active_shape(48) == (48, 1, 48)
    assert trunk.res2[0].depthwise.norm.channels_at(0.35) == 48
    assert trunk.res5.conv_last.active_shape(112) == (1280, 112, 1)
    assert isinstance(model.classifier, SlimLinear) and not model.classifier.slim_out
    with torch.no_grad():
        assert tuple(model(torch.rand(1, 3, 64, 64)).shape) == (1, 1000)


@pytest.mark.parametrize("cls", [MobileNetV1, MobileNetV2])
def test_full_width_equals_plain_trunk(cls):
    plain = cls(norm="BN", out_features=FEATURES).eval()
    _randomize_norms(plain)
    slim = make_mobilenet_slimmable_(copy.deepcopy(plain), [0.25, 0.5, 1.0]).eval()
    assert any(isinstance(m, SlimConv2d) for m in slim.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = plain(x), slim(x)
    for stage in FEATURES:
        torch.testing.assert_close(actual[stage], expected[stage], rtol=0, atol=0)


def test_freeze_at():
    cfg = _cfg(2)
    cfg.MODEL.MOBILENET.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    trunk = BACKBONE_REGISTRY.get("build_slim_mobilenet_v2_backbone")(cfg, ShapeSpec(channels=3))
    for name in ("stem", "res2", "res3"):
        stage = getattr(trunk, name)
        frozen = name != "res3"
        assert all(p.requires_grad != frozen for p in stage.parameters()), name
        norms = [m for m in stage.modules() if isinstance(m, SwitchableNorm)]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name
        privates = [p for m in norms for p in m.private.values()]
        assert all(isinstance(p, FrozenBatchNorm2d) == frozen for p in privates), name


def test_out_features_and_norm_errors():
    trunk = MobileNetV1(out_features=["res3"])
    assert not hasattr(trunk, "res4")
    assert set(trunk(torch.rand(1, 3, 32, 32))) == {"res3"}
    with pytest.raises(ValueError, match="out_features"):
        MobileNetV2(out_features=["res6"])
    with pytest.raises(ValueError, match="'GN' is not supported"):
        MobileNetV2(norm="GN")
