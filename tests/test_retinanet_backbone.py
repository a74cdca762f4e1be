"""RetinaNet's P3-P7 backbones: the slim builders equal detectron2's at width 1.0 and run at every width."""
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import slim_det
from slim_det.channels import channel_groups
from tests.helpers import calibrate_bn_, images


def _retinanet_cfg(backbone):
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT = "BN", 0
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16, 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP, cfg.MODEL.FPN.OUT_CHANNELS = 16, 32
    cfg.MODEL.RETINANET.NUM_CLASSES, cfg.MODEL.SLIM.DIVISOR = 3, 4
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    return cfg


def test_width_one_is_the_stock_retinanet_and_every_width_runs():
    torch.manual_seed(0)
    stock = build_model(_retinanet_cfg("build_retinanet_resnet_fpn_backbone")).eval()
    slim = build_model(_retinanet_cfg("build_slim_retinanet_resnet_fpn_backbone")).eval()
    assert {k: v.shape for k, v in stock.state_dict().items()} == {
        k: v.shape for k, v in slim.state_dict().items() if ".private." not in k}
    inputs = images(1, 96)
    calibrate_bn_(stock, inputs)
    slim.load_state_dict(stock.state_dict(), strict=False)  # private norms: the full one, sliced
    with torch.no_grad():
        expected, got = stock(inputs), slim(inputs)
    assert torch.equal(expected[0]["instances"].pred_boxes.tensor,
                       got[0]["instances"].pred_boxes.tensor)
    for width in (0.75, 0.5, 0.25):
        slim_det.set_width(slim, width)
        with torch.no_grad():
            features = slim.backbone(slim.preprocess_image(inputs).tensor)
        assert sorted(features) == ["p3", "p4", "p5", "p6", "p7"]
        assert all(f.shape[1] == 32 for f in features.values())  # scope backbone: FPN full


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mobilenet_retinanet_backbones_have_p6_p7(version):
    cfg = _retinanet_cfg(f"build_slim_retinanet_mobilenet_{version}_fpn_backbone")
    model = build_model(cfg).eval()
    inputs = images(1, 96)
    calibrate_bn_(model, inputs, widths=(0.25, 0.5, 0.75, 1.0))
    for width in (1.0, 0.25):
        slim_det.set_width(model, width)
        with torch.no_grad():
            features = model.backbone(model.preprocess_image(inputs).tensor)
        assert sorted(features) == ["p3", "p4", "p5", "p6", "p7"]
    # Scope "backbone": P6 / P7 read the slim res5 but keep the FPN's full outputs.
    assert not any("top_block" in m for g in channel_groups(model) for m in g.members)


def test_scope_all_on_retinanet_is_refused_with_what_to_set():
    cfg = _retinanet_cfg("build_slim_retinanet_resnet_fpn_backbone")
    cfg.MODEL.SLIM.SCOPE = "all"
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE is 'RetinaNet'.*SCOPE 'backbone'"):
        build_model(cfg)
