"""An RPN that keeps fewer proposals at inference when the detector runs narrow.

At a narrow width the ROI heads are cheap per proposal, but their count is the same as at width 1,
so the box and mask poolers and the box head take a larger share of a narrow detector's time
(docs/performance.md). ``MODEL.SLIM.RPN_POST_NMS_TOPK_TEST`` lets each width keep its own number
of proposals. It changes outputs (it is not exact): docs/experiments/proposals_per_width.md
measures what it costs in AP and gains in speed.
"""
import torch
from detectron2.config import configurable
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN

from ..config import rpn_post_nms_topk_at, rpn_post_nms_topk_test
from ..width import FollowsWidth

__all__ = ["SlimRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class SlimRPN(FollowsWidth, RPN):
    """detectron2's `RPN` whose inference keeps a width's own number of proposals.

    It reads the width that `slim_det.set_width` sets. With MODEL.SLIM.RPN_POST_NMS_TOPK_TEST
    empty, or in training, it is exactly `RPN`.
    """

    @configurable
    def __init__(self, *, post_nms_topk_per_width=(), **kwargs):
        """
        Args:
            post_nms_topk_per_width: ``(max_width, count)`` pairs: at a width up to ``max_width``
                inference keeps ``count`` proposals per image (the smallest ``max_width`` that
                covers the width applies); wider widths keep ``post_nms_topk[1]``.
            Other arguments: see `RPN`.
        """
        super().__init__(**kwargs)
        self.post_nms_topk_per_width = tuple(sorted(post_nms_topk_per_width))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["post_nms_topk_per_width"] = rpn_post_nms_topk_test(cfg)
        return ret

    def test_post_nms_topk(self, width=None):
        """Proposals per image that inference keeps at ``width`` (default: the current width)."""
        width = self.width if width is None else width
        return rpn_post_nms_topk_at(self.post_nms_topk_per_width, width, self.post_nms_topk[False])

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        if self.training or not self.post_nms_topk_per_width:
            return super().predict_proposals(
                anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        with torch.no_grad():  # as RPN.predict_proposals: proposals are fixed boxes
            proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            return find_top_rpn_proposals(
                proposals, pred_objectness_logits, image_sizes, self.nms_thresh,
                self.pre_nms_topk[False], self.test_post_nms_topk(), self.min_box_size, False,
            )
