"""RPN and ROI heads that slim with MODEL.SLIM.SCOPE "all" and are stock with "backbone".

Each head is built by detectron2 as usual, then made slimmable in place; predictors keep their
full outputs (classes, box deltas, anchors, mask classes, keypoints) and read slim inputs.
"""
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

from ..config import slim_settings
from ..layers import make_slimmable_


def _head_slim_settings(cfg):
    widths, scope, divisor = slim_settings(cfg)
    return {"widths": widths, "divisor": divisor} if scope == "all" else None


@RPN_HEAD_REGISTRY.register()
class SlimRPNHead(StandardRPNHead):
    """detectron2's `StandardRPNHead`, slimmable when MODEL.SLIM.SCOPE is "all"."""

    @configurable
    def __init__(self, *, slim=None, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the head
                slimmable, or None for the stock head. Other arguments: see `StandardRPNHead`.
        """
        super().__init__(**kwargs)
        if slim:
            make_slimmable_(self, **slim, keep_out=("objectness_logits", "anchor_deltas"))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["slim"] = _head_slim_settings(cfg)
        return ret


@ROI_HEADS_REGISTRY.register()
class SlimStandardROIHeads(StandardROIHeads):
    """detectron2's `StandardROIHeads` whose box, mask and keypoint heads slim with scope "all"."""

    @configurable
    def __init__(self, *, slim=None, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the heads
                slimmable, or None for the stock heads. Other arguments: see `StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if not slim:
            return
        make_slimmable_(self.box_head, **slim)
        make_slimmable_(self.box_predictor, **slim, slim_out=False)
        if self.mask_on:
            make_slimmable_(self.mask_head, **slim, keep_out=("predictor",))
        if self.keypoint_on:
            make_slimmable_(self.keypoint_head, **slim, keep_out=("score_lowres",))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["slim"] = _head_slim_settings(cfg)
        return ret
