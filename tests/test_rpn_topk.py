"""MODEL.SLIM.RPN_POST_NMS_TOPK_TEST: fewer proposals at narrow widths (SlimRPN)."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling.proposal_generator.rpn import RPN

import slim_det
from slim_det.export import export_width, max_output_difference
from tests.helpers import fast_cpu  # noqa: F401  (autouse: one thread, no oneDNN)
from tests.test_export import REPO, image, tiny_model

TABLE = [[0.5, 12], [0.25, 5]]  # the shared tiny model keeps 30 proposals (POST_NMS_TOPK_TEST)


def proposals(model, width):
    """The RPN's proposals for one image at ``width`` (the inference path)."""
    with torch.no_grad(), slim_det.using_width(model, width):
        batch = model.preprocess_image([{"image": image()}])
        features = model.backbone(batch.tensor)
        return model.proposal_generator(batch, features)[0][0]


@pytest.fixture(scope="module")
def models():
    """The same tiny Mask R-CNN (scope all) without and with the per-width table."""
    return tiny_model()[1], tiny_model(opts=["MODEL.SLIM.RPN_POST_NMS_TOPK_TEST", TABLE])


def test_empty_table_is_detectron2s_rpn(models):
    plain_rpn, _ = models
    assert type(plain_rpn.proposal_generator) is slim_det.SlimRPN
    for width in (1.0, 0.25):
        ours = proposals(plain_rpn, width)
        generator = plain_rpn.proposal_generator
        generator.__class__ = RPN  # the stock method on the same module and weights
        try:
            stock = proposals(plain_rpn, width)
        finally:
            generator.__class__ = slim_det.SlimRPN
        assert len(ours) == 30
        assert torch.equal(ours.proposal_boxes.tensor, stock.proposal_boxes.tensor)
        assert torch.equal(ours.objectness_logits, stock.objectness_logits)


def test_each_width_keeps_its_count_the_top_of_the_full_list(models):
    plain_rpn, (_, model) = models
    generator = model.proposal_generator
    assert generator.post_nms_topk_per_width == ((0.25, 5), (0.5, 12))
    expected = {1.0: 30, 0.75: 30, 0.5: 12, 0.4: 12, 0.25: 5, 0.1: 5}
    assert {w: generator.test_post_nms_topk(w) for w in expected} == expected
    for width, count in [(1.0, 30), (0.5, 12), (0.25, 5)]:
        kept = proposals(model, width)
        everything = proposals(plain_rpn, width)  # same seed and statistics: same weights
        assert len(kept) == count
        assert torch.equal(kept.proposal_boxes.tensor, everything.proposal_boxes.tensor[:count])
    # set_width is the one entry point: the RPN follows it both ways, and training is untouched.
    slim_det.set_width(model, 0.25)
    assert generator.width == 0.25
    slim_det.set_width(model, 1.0)
    assert generator.width == 1.0


def test_export_carries_the_widths_count(models):
    _, (cfg, model) = models
    plain_cfg, plain, _ = export_width(model, cfg, 0.25)
    assert plain_cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
    assert plain_cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 5
    inputs = [{"image": image()}]
    with torch.no_grad(), slim_det.using_width(model, 0.25):
        expected = model(inputs)
    with torch.no_grad():
        outputs = plain(inputs)
    assert max_output_difference(outputs, expected) < 1e-4
    assert export_width(model, cfg, 1.0)[0].MODEL.RPN.POST_NMS_TOPK_TEST == 30


@pytest.mark.parametrize("value, message", [
    ([[0.5]], r"\[max_width, count\] pairs.*got \[0.5\]"),
    ([[1.5, 10]], r"width in \(0, 1\].*got \[1.5, 10\]"),
    ([[0.5, 0]], r"count >= 1.*got \[0.5, 0\]"),
    ([[0.5, 2.5]], r"count >= 1.*got \[0.5, 2.5\]"),
    ([[0.5, 10], [0.5, 20]], r"must not repeat a width"),
    (0.5, r"must be a list of \[max_width, count\] pairs"),
])
def test_bad_tables_are_refused(value, message):
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", "slim_mask_rcnn_all.yaml"))
    cfg.MODEL.SLIM.RPN_POST_NMS_TOPK_TEST = value
    with pytest.raises(ValueError, match="MODEL.SLIM.RPN_POST_NMS_TOPK_TEST .*" + message):
        slim_det.config.slim_settings(cfg)


def test_stock_rpn_with_a_table_is_refused():
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", "slim_mask_rcnn_all.yaml"))
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    cfg.MODEL.SLIM.RPN_POST_NMS_TOPK_TEST = [[0.5, 10]]
    with pytest.raises(ValueError, match="needs MODEL.PROPOSAL_GENERATOR.NAME 'SlimRPN'.*'RPN'"):
        slim_det.config.slim_settings(cfg)
