"""Channel groups and non-uniform channel configurations (slim_det.channels)."""
import copy
import random

import pytest
import torch
from detectron2.utils.events import EventStorage

import slim_det
from slim_det.analysis import active_parameter_count
from slim_det.calibration import calibrate_norms
from slim_det.channels import (
    channel_groups,
    get_channels,
    load_channels,
    save_channels,
    set_channels,
    uniform_channels,
)
from slim_det.export import max_output_difference
from slim_det.modeling.plain import freeze_current_
from slim_det.width import SlimModule
from tests.helpers import build, calibrate_bn_, images, slim_cfg


def _model(task="mask", scope="all", depth=50, backbone=None):
    cfg = slim_cfg(task, scope)
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    if backbone:
        cfg.MODEL.BACKBONE.NAME = backbone
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    return calibrate_bn_(build(cfg), images(1, 96), widths=(0.25, 0.5, 0.75, 1.0))


def _names(model):
    return {g.name: g for g in channel_groups(model)}


def test_resnet50_fpn_groups_follow_the_additions():
    groups = _names(_model())
    # A stage's residual stream: its shortcut projection and every block's last conv.
    res3 = groups["backbone.bottom_up.res3"]
    assert res3.members == ("backbone.bottom_up.res3.0.shortcut",) + tuple(
        f"backbone.bottom_up.res3.{i}.conv3" for i in range(4))
    assert res3.full == 128 and len(res3.norms) == 5
    # Each block's inner convs are free; the FPN laterals are tied by the top-down sums, the FPN
    # outputs by the RPN conv and the ROI pooler that read every level.
    assert groups["backbone.bottom_up.res3.1.conv2"].members == ("backbone.bottom_up.res3.1.conv2",)
    assert len(groups["backbone.fpn_lateral"].members) == 4
    assert len(groups["backbone.fpn_output"].members) == 4
    for head in ("proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1",
                 "roi_heads.box_head.fc2", "roi_heads.mask_head.mask_fcn1",
                 "roi_heads.mask_head.deconv"):
        assert head in groups
    assert len(groups) == 1 + 4 + 2 * 16 + 2 + 1 + 2 + 5
    for group in groups.values():
        assert group.allowed[-1] == group.full and group.allowed[0] == 4  # DIVISOR 4


def test_resnet18_identity_shortcut_ties_the_stem_to_res2():
    groups = _names(_model(depth=18))
    stream = next(g for g in groups.values() if "backbone.bottom_up.stem.conv1" in g.members)
    assert "backbone.bottom_up.res2.0.conv2" in stream.members
    assert "backbone.bottom_up.res2.1.conv2" in stream.members


def test_scope_backbone_has_no_head_groups():
    groups = _names(_model(scope="backbone"))
    assert all(name.startswith("backbone.bottom_up") for name in groups)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mobilenet_groups(version):
    groups = _names(_model(backbone=f"build_slim_mobilenet_{version}_fpn_backbone"))
    if version == "v2":
        # Blocks with an identity shortcut tie their projections: res3 has 3 blocks of 32.
        res3 = next(g for g in groups.values() if "backbone.bottom_up.res3.1.project" in g.members)
        assert {"backbone.bottom_up.res3.0.project", "backbone.bottom_up.res3.2.project"} <= set(
            res3.members)
        # The expansion conv's group also sets its depthwise conv's norm.
        expand = groups["backbone.bottom_up.res3.1.expand"]
        assert "backbone.bottom_up.res3.1.depthwise.norm" in expand.norms
        assert all(c % (expand.divisor * expand.expansion) == 0 for c in expand.allowed[:-1])
    else:
        assert "backbone.bottom_up.res3.1.pointwise" in groups


@pytest.mark.parametrize("task,depth", [("mask", 50), ("keypoint", 18), ("faster", 50)])
def test_random_configurations_run_and_equal_a_plain_model(task, depth):
    model = _model(task, depth=depth)
    inputs = images(2, 96)
    rng = random.Random(depth)
    for _ in range(2):
        config = set_channels(model, {g.name: rng.choice(g.allowed)
                                      for g in channel_groups(model)})
        assert get_channels(model) == config
        calibrate_norms(model, [inputs], [config], 2)
        with torch.no_grad():
            outputs = model(inputs)
        plain = copy.deepcopy(model)
        plain.roi_heads.box_predictor.test_score_thresh = 0.0
        freeze_current_(plain, inputs)
        assert not any(isinstance(m, SlimModule) for m in plain.modules())
        assert active_parameter_count(model, inputs) == sum(p.numel() for p in plain.parameters())
        with torch.no_grad():
            assert max_output_difference(outputs, plain(inputs)) < 1e-4
    # Forward and backward in training mode (batch statistics).
    model.train()
    batch = [dict(x, instances=_instances(task)) for x in images(2, 96)]
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def _instances(task):
    from detectron2.structures import Boxes, Instances, PolygonMasks

    inst = Instances((96, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 70.0]]))
    inst.gt_classes = torch.tensor([0])
    if task == "mask":
        inst.gt_masks = PolygonMasks([[[10, 10, 60, 10, 60, 70, 10, 70]]])
    if task == "keypoint":
        from detectron2.structures import Keypoints

        kps = torch.zeros(1, 17, 3)
        kps[0, :, 0], kps[0, :, 1], kps[0, :, 2] = 30, 40, 2
        inst.gt_keypoints = Keypoints(kps)
    return inst


def test_set_width_after_set_channels_is_the_uniform_model_bit_for_bit():
    model = _model()
    inputs = images(1, 96)
    slim_det.set_width(model, 0.5)
    with torch.no_grad():
        before = model(inputs)
    set_channels(model, {g.name: g.allowed[0] for g in channel_groups(model)})
    with pytest.raises(ValueError, match="runs channel configuration"):
        slim_det.get_width(model)
    slim_det.set_width(model, 0.5)
    with torch.no_grad():
        after = model(inputs)
    assert max_output_difference(before, after) == 0.0
    assert get_channels(model) == uniform_channels(model, 0.5)


def test_uncalibrated_configuration_is_refused_in_eval():
    model = _model()
    set_channels(model, uniform_channels(model, 0.75))
    with pytest.raises(ValueError, match="has no calibrated batch-norm statistics"):
        with torch.no_grad():
            model(images(1, 96))


def test_bad_configurations_name_the_group():
    model = _model()
    groups = channel_groups(model)
    full = {g.name: g.full for g in groups}
    with pytest.raises(ValueError, match=r"'backbone.fpn_lateral' cannot have 3 channels; allowed"):
        set_channels(model, dict(full, **{"backbone.fpn_lateral": 3}))
    with pytest.raises(ValueError, match=r"Unknown channel groups \['nope'\]"):
        set_channels(model, dict(full, nope=8))
    partial = dict(full)
    del partial["roi_heads.box_head.fc2"]
    with pytest.raises(ValueError, match=r"misses groups \['roi_heads.box_head.fc2'\]"):
        set_channels(model, partial)
    with pytest.raises(ValueError, match="fraction must be in"):
        set_channels(model, dict(full, **{"roi_heads.box_head.fc2": 1.5}))
    # Fractions are the uniform width's count.
    assert set_channels(model, {g.name: 0.5 for g in groups}) == uniform_channels(model, 0.5)


def test_configuration_json_round_trip_and_bad_files(tmp_path):
    model = _model()
    config = uniform_channels(model, 0.5)
    path = str(tmp_path / "c.json")
    save_channels(config, path, costs={"gflops": 1.0})
    assert load_channels(path) == config
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_channels(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="does not exist"):
        load_channels(str(tmp_path / "missing.json"))


def test_calibrated_configuration_survives_a_checkpoint(tmp_path):
    model = _model()
    inputs = images(1, 96)
    config = set_channels(model, {g.name: g.allowed[len(g.allowed) // 2]
                                  for g in channel_groups(model)})
    calibrate_norms(model, [inputs], [config], 1)
    with torch.no_grad():
        expected = model(inputs)
    state = model.state_dict()
    assert any(f".private.{config.name}." in k for k in state)
    fresh = _model()
    fresh.load_state_dict(state)
    set_channels(fresh, config)
    with torch.no_grad():
        assert max_output_difference(expected, fresh(inputs)) == 0.0


def test_width_selector_chooses_among_widths_and_configurations():
    from slim_det.deploy import NoWidthFitsError, WidthSelector

    model = _model()
    inputs = images(1, 96)
    small = set_channels(model, {g.name: g.allowed[len(g.allowed) // 3]
                                 for g in channel_groups(model)})
    slim_det.set_width(model, 0.75)
    with pytest.raises(ValueError, match="'searched' .* has no calibrated batch-norm statistics"):
        WidthSelector(model, configurations={"searched": small})
    assert slim_det.get_width(model) == 0.75  # the check leaves the model's setting alone
    calibrate_norms(model, [inputs], [small], 1)
    times = {0.25: 10.0, 0.5: 20.0, 0.75: 30.0, 1.0: 40.0, "searched": 15.0}
    selector = WidthSelector(model, widths=[0.25, 0.5, 0.75, 1.0], inputs=inputs,
                             configurations={"searched": small}, timer=times.get)
    sizes = selector.sizes()
    assert sizes[0.25] < sizes["searched"] < sizes[0.5]  # a third of every group's channels
    assert selector.select(16) == "searched"
    assert selector.select(25) == 0.5
    with pytest.raises(NoWidthFitsError, match="fastest, 0.25, takes 10.0 ms"):
        selector.select(5)
    selector.apply("searched")
    assert get_channels(model) == small
    # Real timing of a configuration restores the model's setting afterwards.
    real = WidthSelector(model, widths=[0.5], inputs=inputs, configurations={"s": small},
                         warmup=0, repeats=1)
    slim_det.set_width(model, 0.5)
    assert set(real.measure()) == {0.5, "s"}
    assert slim_det.get_width(model) == 0.5


def test_package_exports_the_channel_api():
    assert slim_det.channel_groups is channel_groups
    assert slim_det.set_channels is set_channels and slim_det.get_channels is get_channels
