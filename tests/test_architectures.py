"""RetinaNet, Cascade Mask R-CNN and Panoptic FPN with slim backbones and heads (scope "all").

Each model is detectron2's model-zoo config with only the backbone / head names changed and the
sizes shrunk: width 1.0 is the stock model, every width runs, and the parameters a width uses are
those of the stock model with that width's channels.
"""
import copy
import random

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import slim_det
from slim_det.analysis import active_parameter_count, detector_costs
from slim_det.calibration import calibrate_norms
from slim_det.channels import channel_groups, set_channels
from slim_det.config import slim_settings
from slim_det.layers import SlimConv2d, SlimLinear
from slim_det.modeling.plain import freeze_current_
from slim_det.width import SlimModule
from tests.helpers import calibrate_bn_, fast_cpu, images  # noqa: F401  (fast_cpu: autouse)

WIDTHS = (0.25, 0.5, 0.75, 1.0)
DIVISOR = 4

ZOO = {
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "cascade": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "panoptic": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
}
# What a config changes to make the zoo model slim: the backbone and head names only.
SLIM_NAMES = {
    "retinanet": {"MODEL.BACKBONE.NAME": "build_slim_retinanet_resnet_fpn_backbone",
                  "MODEL.META_ARCHITECTURE": "SlimRetinaNet"},
    "cascade": {"MODEL.BACKBONE.NAME": "build_slim_resnet_fpn_backbone",
                "MODEL.RPN.HEAD_NAME": "SlimRPNHead",
                "MODEL.ROI_HEADS.NAME": "SlimCascadeROIHeads"},
    "panoptic": {"MODEL.BACKBONE.NAME": "build_slim_resnet_fpn_backbone",
                 "MODEL.RPN.HEAD_NAME": "SlimRPNHead",
                 "MODEL.ROI_HEADS.NAME": "SlimStandardROIHeads",
                 "MODEL.SEM_SEG_HEAD.NAME": "SlimSemSegFPNHead"},
}
ARCHITECTURES = sorted(ZOO)


def _cfg(arch, slim=True, scope="all", width=1.0, fpn_width=None):
    """The zoo config of ``arch``, small, on CPU; the slim names, or stock ones ``width`` wide
    (the FPN ``fpn_width`` wide, by default ``width``)."""
    cfg = slim_det.add_slim_config(get_cfg())  # stock builders ignore MODEL.SLIM
    cfg.merge_from_file(model_zoo.get_config_file(ZOO[arch]))
    c = lambda n: slim_det.active_channels(n, width, DIVISOR)  # noqa: E731
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
            "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", c(16), "MODEL.RESNETS.RES2_OUT_CHANNELS", c(64),
            "MODEL.RESNETS.WIDTH_PER_GROUP", c(16), "MODEL.FPN.OUT_CHANNELS",
            slim_det.active_channels(32, fpn_width or width, DIVISOR),
            "MODEL.ROI_BOX_HEAD.FC_DIM", c(64), "MODEL.ROI_MASK_HEAD.CONV_DIM", c(16),
            # detectron2's GN has 32 groups: 128 keeps every narrow stock head valid.
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", c(128), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4,
            "MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 20,
            "MODEL.SLIM.SCOPE", scope, "MODEL.SLIM.DIVISOR", DIVISOR]
    if slim:
        opts += [item for pair in SLIM_NAMES[arch].items() for item in pair]
    cfg.merge_from_list(opts)
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _assert_same_outputs(expected, got):
    assert len(expected) == len(got) == 1
    expected, got = expected[0], got[0]
    assert sorted(expected) == sorted(got)
    if "instances" in expected:
        a, b = expected["instances"], got["instances"]
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        if a.has("pred_masks"):
            assert torch.equal(a.pred_masks, b.pred_masks)
    if "sem_seg" in expected:
        assert torch.equal(expected["sem_seg"], got["sem_seg"])
    if "panoptic_seg" in expected:
        (a, a_info), (b, b_info) = expected["panoptic_seg"], got["panoptic_seg"]
        assert torch.equal(a, b) and a_info == b_info


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_width_one_is_the_stock_model_with_either_scope(arch):
    inputs = images(1, 96)
    stock = calibrate_bn_(_build(_cfg(arch, slim=False)), inputs)
    with torch.no_grad():
        expected = stock(inputs)
    for scope in ("backbone", "all"):
        slim = _build(_cfg(arch, scope=scope))
        # Same tensors under the same names; private norms are derived from the full ones.
        assert {k: v.shape for k, v in stock.state_dict().items()} == {
            k: v.shape for k, v in slim.state_dict().items() if ".private." not in k}
        slim.load_state_dict(stock.state_dict())
        with torch.no_grad():
            _assert_same_outputs(expected, slim(inputs))


def _heads(model):
    """The model's modules outside the backbone."""
    return [m for name, m in model.named_children() if name != "backbone"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scope_backbone_keeps_the_heads_stock(arch):
    model = build_model(_cfg(arch, scope="backbone"))
    assert not any(isinstance(m, SlimModule) for head in _heads(model) for m in head.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_width_runs_with_the_parameters_of_the_stock_model_of_that_width(arch):
    inputs = images(1, 96)
    model = calibrate_bn_(_build(_cfg(arch)), inputs, WIDTHS)
    counts = []
    for width in WIDTHS:
        slim_det.set_width(model, width)
        with torch.no_grad():
            output = model(inputs)[0]
        if "instances" in output:
            assert len(output["instances"]) > 0
        if "sem_seg" in output:  # the predictor keeps every class
            assert output["sem_seg"].shape == (4, 96, 96)
        counts.append(active_parameter_count(model, inputs))
        plain = build_model(_cfg(arch, slim=False, width=width))
        assert counts[-1] == sum(p.numel() for p in plain.parameters())
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_retinanet_subnets_keep_the_fpn_floor():
    """The stock head's convs are as wide as the FPN, so they share its MODEL.SLIM.FPN_MIN_WIDTH."""
    inputs = images(1, 96)
    cfg = _cfg("retinanet")
    cfg.MODEL.SLIM.FPN_MIN_WIDTH = 0.5
    model = calibrate_bn_(_build(cfg), inputs, WIDTHS)
    slim_det.set_width(model, 0.25)
    plain = build_model(_cfg("retinanet", slim=False, width=0.25, fpn_width=0.5))
    assert active_parameter_count(model, inputs) == sum(p.numel() for p in plain.parameters())
    assert model.head.cls_subnet[0].active_out(32) == 16


@pytest.mark.parametrize("arch, head_norm", [(a, "") for a in ARCHITECTURES] +
                         [("retinanet", "FrozenBN")])  # norms outside the convs
def test_channel_groups_cover_the_heads_and_a_configuration_freezes_exactly(arch, head_norm):
    inputs = images(1, 96)
    cfg = _cfg(arch)
    cfg.MODEL.RETINANET.NORM = head_norm
    model = calibrate_bn_(_build(cfg), inputs, WIDTHS)
    groups = channel_groups(model)
    members = {m for g in groups for m in g.members}
    slimming = {name for head_name, head in model.named_children() if head_name != "backbone"
                for name, m in head.named_modules(prefix=head_name)
                if isinstance(m, (SlimConv2d, SlimLinear)) and m.slim_out}
    assert slimming and slimming <= members  # every slimming head layer ran in the trace
    rng = random.Random(0)
    config = set_channels(model, {g.name: rng.choice(g.allowed) for g in groups})
    # Two images: RetinaNet's P7 is 1 x 1, and a batch norm needs two values per channel.
    calibrate_norms(model, [images(2, 96)], [config], 2)
    plain = freeze_current_(copy.deepcopy(model), inputs)
    assert active_parameter_count(model, inputs) == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        got, expected = model(inputs)[0], plain(inputs)[0]
    if "sem_seg" in expected:
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], rtol=0, atol=1e-4)
    if "instances" in expected:
        torch.testing.assert_close(got["instances"].scores, expected["instances"].scores,
                                   rtol=0, atol=1e-4)


def _training_inputs():
    batch = images(1, 96)
    inst = Instances((96, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 70.0]]))
    inst.gt_classes = torch.tensor([1])
    inst.gt_masks = PolygonMasks([[[10, 10, 60, 10, 60, 70, 10, 70]]])
    batch[0]["instances"] = inst
    batch[0]["sem_seg"] = torch.randint(0, 4, (96, 96))
    return batch


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_width_trains(arch):
    model = _build(_cfg(arch)).train()
    batch = _training_inputs()
    with EventStorage():
        for width in (1.0, 0.25):
            slim_det.set_width(model, width)
            losses = model(batch)
            assert losses and all(torch.isfinite(v) for v in losses.values())
            sum(losses.values()).backward()
    # Predictors keep their outputs at every width, and learn from each.
    predictors = {"retinanet": "head.cls_score", "cascade": "roi_heads.box_predictor.2.cls_score",
                  "panoptic": "sem_seg_head.predictor"}
    assert model.get_submodule(predictors[arch]).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES + ["semantic"])
def test_costs_count_every_layer_that_inference_runs(arch):
    """`detector_costs` runs the heads on fixed ROI counts: RetinaNet's dense head, every
    cascade stage, Panoptic FPN's semantic head; the parameters are those inference uses."""
    cfg = _cfg("panoptic" if arch == "semantic" else arch)
    if arch == "semantic":
        cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    inputs = images(1, 96)
    model = _build(cfg)
    calibrate_norms(model, [inputs], WIDTHS, 1)
    for width in (1.0, 0.25):
        slim_det.set_width(model, width)
        costs = detector_costs(model, (96, 96), 50, 20)
        assert costs["params"] == active_parameter_count(model, inputs)
        assert costs["gflops"] > costs["backbone_gflops"] > 0


def test_costs_name_layers_they_do_not_know():
    model = _build(_cfg("retinanet"))
    model.extra_head = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(NotImplementedError, match=r"RetinaNet has layers .*\['extra_head'\]"):
        detector_costs(model, (96, 96), 50, 20)


# ----------------------------------------------------------------------- scope "all" refusals


@pytest.mark.parametrize(
    "arch, key, value, message",
    [
        ("retinanet", "MODEL.META_ARCHITECTURE", "RetinaNet",
         r"MODEL.META_ARCHITECTURE is 'RetinaNet'.*set MODEL.META_ARCHITECTURE 'SlimRetinaNet'"),
        ("retinanet", "MODEL.META_ARCHITECTURE", "FCOS",
         r"MODEL.META_ARCHITECTURE is 'FCOS', whose heads have no slim version: set "
         r"MODEL.SLIM.SCOPE 'backbone'"),
        ("retinanet", "MODEL.RETINANET.NORM", "BN",
         r"MODEL.RETINANET.NORM 'BN' .*set MODEL.RETINANET.NORM to '', 'GN'"),
        ("cascade", "MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
         r"needs MODEL.ROI_HEADS.NAME in .*got 'CascadeROIHeads': set MODEL.ROI_HEADS.NAME "
         r"'SlimCascadeROIHeads'"),
        ("cascade", "MODEL.ROI_HEADS.NAME", "Res5ROIHeads",
         r"got 'Res5ROIHeads': 'Res5ROIHeads' has no slim version: set MODEL.SLIM.SCOPE "
         r"'backbone'"),
        ("panoptic", "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead",
         r"needs MODEL.SEM_SEG_HEAD.NAME in .*set MODEL.SEM_SEG_HEAD.NAME 'SlimSemSegFPNHead'"),
        ("panoptic", "MODEL.RPN.HEAD_NAME", "StandardRPNHead",
         r"set MODEL.RPN.HEAD_NAME 'SlimRPNHead'"),
    ],
)
def test_scope_all_refuses_heads_that_cannot_slim_and_says_what_to_set(arch, key, value, message):
    cfg = _cfg(arch)
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        slim_settings(cfg)
    cfg.MODEL.SLIM.SCOPE = "backbone"  # the stock heads are fine when they stay full width
    slim_settings(cfg)


def test_semantic_segmentor_slims_its_head_under_scope_all():
    cfg = _cfg("panoptic")
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    inputs = images(1, 96)
    model = _build(cfg)
    calibrate_norms(model, [inputs], WIDTHS, 1)  # SemanticSegmentor has no preprocess_image
    sizes = []
    for width in (1.0, 0.25):
        slim_det.set_width(model, width)
        with torch.no_grad():
            assert model(inputs)[0]["sem_seg"].shape == (4, 96, 96)
        sizes.append(active_parameter_count(model, inputs))
    assert sizes[1] < sizes[0]
