import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import slim_det
from tests.helpers import slim_cfg


def test_defaults():
    cfg = slim_det.add_slim_config(get_cfg())
    assert cfg.MODEL.SLIM.WIDTHS == [0.25, 0.5, 0.75, 1.0]
    assert cfg.MODEL.SLIM.SCOPE == "backbone"
    assert cfg.MODEL.SLIM.DIVISOR == 8
    assert cfg.MODEL.SLIM.TEST_WIDTHS == []


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("WIDTHS", [0.5, 1.5], r"MODEL.SLIM.WIDTHS must hold widths in \(0, 1\]; got \[0.5, 1.5\]"),
        ("WIDTHS", [0.0, 1.0], r"MODEL.SLIM.WIDTHS must hold widths in \(0, 1\]"),
        ("WIDTHS", [0.5, 0.5, 1.0], r"must not repeat a width; got \[0.5, 0.5, 1.0\]"),
        ("WIDTHS", [0.25, 0.5], r"largest of MODEL.SLIM.WIDTHS must be 1.0; got \[0.25, 0.5\]"),
        ("WIDTHS", [], r"at least one width"),
        ("SCOPE", "heads", r"MODEL.SLIM.SCOPE must be one of \('backbone', 'all'\); got 'heads'"),
        ("DIVISOR", 0, r"MODEL.SLIM.DIVISOR must be a positive integer; got 0"),
        ("TEST_WIDTHS", [2.0], r"MODEL.SLIM.TEST_WIDTHS must hold widths in \(0, 1\]; got \[2.0\]"),
    ],
)
def test_bad_slim_config_fails_when_the_model_is_built(key, value, message):
    cfg = slim_cfg("faster")
    cfg.MODEL.SLIM[key] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


@pytest.mark.parametrize(
    "scope, value, message",
    [
        ("all", 1.5, r"MODEL.SLIM.FPN_MIN_WIDTH must be a number in \[0, 1\].*got 1.5"),
        ("all", -0.5, r"MODEL.SLIM.FPN_MIN_WIDTH must be a number in \[0, 1\].*got -0.5"),
        ("all", "half", r"MODEL.SLIM.FPN_MIN_WIDTH must be a number in \[0, 1\].*got 'half'"),
        ("backbone", True, r"MODEL.SLIM.FPN_MIN_WIDTH must be a number in \[0, 1\].*got True"),
    ],
)
def test_bad_fpn_min_width_is_named(scope, value, message):
    cfg = slim_cfg("faster", scope=scope)
    cfg.MODEL.SLIM.FPN_MIN_WIDTH = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_scope_all_needs_slim_heads():
    cfg = slim_cfg("faster", scope="all")
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    with pytest.raises(ValueError, match="needs MODEL.ROI_HEADS.NAME in .*got 'StandardROIHeads'"):
        build_model(cfg)


def test_unsupported_resnet_options_are_named():
    cfg = slim_cfg("faster")
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, False, False]
    with pytest.raises(ValueError, match="DEFORM_ON_PER_STAGE must be all False"):
        build_model(cfg)
    cfg = slim_cfg("faster")
    cfg.MODEL.RESNETS.NUM_GROUPS = 32
    with pytest.raises(ValueError, match="NUM_GROUPS must be 1 for a slim ResNet.*got 32"):
        build_model(cfg)


def test_missing_add_slim_config_is_explained():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_slim_resnet_fpn_backbone"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError, match="add_slim_config"):
        build_model(cfg)


@pytest.mark.parametrize(
    "name",
    ["slim_faster_rcnn", "slim_mask_rcnn", "slim_keypoint_rcnn", "slim_faster_rcnn_all",
     "slim_mask_rcnn_all", "slim_keypoint_rcnn_all"],
)
def test_coco_configs_load(name):
    import os

    from tests.helpers import CONFIGS

    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_slim_resnet_fpn_backbone"
    assert cfg.MODEL.SLIM.SCOPE == ("all" if name.endswith("_all") else "backbone")
    assert cfg.DATASETS.TRAIN[0].endswith("coco_2017_train")


def test_scaled_lr_steps_keep_their_fractions_and_drop_those_that_never_fire():
    from slim_det.config import scaled_lr_steps

    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 255, (220,)
    assert scaled_lr_steps(cfg, 180) == (155,)
    assert scaled_lr_steps(cfg, 510) == (440,)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 100, (1, 50, 99)
    assert scaled_lr_steps(cfg, 10) == (5,)  # 1 -> 0 and 99 -> 10 (the end) are dropped


# detectron2's zoo config of each architecture config next to the R-CNN ones, and what the slim one
# changes: the meta-architecture class built, and the dataset it trains on.
ARCHITECTURE_CONFIGS = {
    "slim_retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "SlimRetinaNet",
                       "coco_2017_train"),
    "slim_cascade_mask_rcnn": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "GeneralizedRCNN",
                               "coco_2017_train"),
    "slim_panoptic_fpn": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", "PanopticFPN",
                          "coco_2017_train_panoptic_separated"),
}


@pytest.fixture(scope="module")
def zoo_shapes():
    """Parameter and buffer shapes of detectron2's zoo models, built once per module."""
    from detectron2 import model_zoo

    shapes = {}
    for name, (zoo, _, _) in ARCHITECTURE_CONFIGS.items():
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(zoo))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
        shapes[name] = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    return shapes


@pytest.mark.parametrize("name", [f"{n}{s}" for n in ARCHITECTURE_CONFIGS for s in ("", "_all")])
def test_architecture_configs_build_detectron2s_zoo_model(name, zoo_shapes):
    """configs/slim_{retinanet,cascade_mask_rcnn,panoptic_fpn}[_all].yaml validate and build the
    zoo model's tensors (plus each width's private norms); "_all" slims the heads too."""
    import os

    from slim_det.width import SlimModule
    from tests.helpers import CONFIGS

    base = name[:-len("_all")] if name.endswith("_all") else name
    _, meta_architecture, train_set = ARCHITECTURE_CONFIGS[base]
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg.MODEL.SLIM.SCOPE == ("all" if name.endswith("_all") else "backbone")
    assert cfg.DATASETS.TRAIN == (train_set,)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    assert type(model).__name__ == meta_architecture
    shapes = {k: v.shape for k, v in model.state_dict().items() if ".private." not in k}
    assert shapes == zoo_shapes[base]
    heads = [m for n, child in model.named_children() if n != "backbone" for m in child.modules()]
    assert any(isinstance(m, SlimModule) for m in heads) == (cfg.MODEL.SLIM.SCOPE == "all")


@pytest.mark.parametrize("name", ["retinanet", "cascade_mask_rcnn", "panoptic_fpn"])
def test_architecture_shapes_configs_build(name):
    import os

    from tests.helpers import CONFIGS

    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, "shapes", f"slim_{name}_shapes.yaml"))
    assert cfg.MODEL.SLIM.SCOPE == "all" and cfg.OUTPUT_DIR == f"output/shapes_{name}"
    build_model(cfg)
