"""RPN, ROI and semantic segmentation heads that slim with MODEL.SLIM.SCOPE "all" and are stock
with "backbone".

Each head is built by detectron2 as usual, then made slimmable in place; predictors keep their
full outputs (classes, box deltas, anchors, mask classes, keypoints, segmentation classes) and read
slim inputs. RetinaNet's head has no registry in detectron2; it slims in `SlimRetinaNet`
(``retinanet.py``).
"""
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, SEM_SEG_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads

from ..config import fpn_min_width, slim_settings
from ..layers import make_slimmable_
from ..roi_align import use_parallel_roi_align_


def head_slim_settings(cfg):
    """``{"widths": [...], "divisor": int}`` for `make_slimmable_` with scope "all", else None."""
    widths, scope, divisor = slim_settings(cfg)
    return {"widths": widths, "divisor": divisor} if scope == "all" else None


def _convs_as_wide_as_input(conv_dims):
    """Names of the RPN convs whose channels are the FPN's: the leading run of ``-1`` dims."""
    names = ["conv"] if len(conv_dims) == 1 else [f"conv.conv{k}" for k in range(len(conv_dims))]
    leading = []
    for name, dim in zip(names, conv_dims):
        if dim != -1:
            break
        leading.append(name)
    return leading


@RPN_HEAD_REGISTRY.register()
class SlimRPNHead(StandardRPNHead):
    """detectron2's `StandardRPNHead`, slimmable when MODEL.SLIM.SCOPE is "all"."""

    @configurable
    def __init__(self, *, slim=None, fpn_min_width=0.0, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the head
                slimmable, or None for the stock head.
            fpn_min_width (float): MODEL.SLIM.FPN_MIN_WIDTH. A conv of ``CONV_DIMS`` -1 ("as
                wide as the input") stays as wide as the FPN, as in the stock head.
            Other arguments: see `StandardRPNHead`.
        """
        super().__init__(**kwargs)
        if not slim:
            return
        as_wide_as_fpn = _convs_as_wide_as_input(kwargs.get("conv_dims", (-1,)))
        for name in as_wide_as_fpn:
            make_slimmable_(self.get_submodule(name), **slim, min_width=fpn_min_width)
        make_slimmable_(self, **slim, keep_out=("objectness_logits", "anchor_deltas"))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["slim"] = head_slim_settings(cfg)
        ret["fpn_min_width"] = fpn_min_width(cfg)
        return ret


def make_roi_heads_slimmable_(roi_heads, slim):
    """Make the box, mask and keypoint heads of built `StandardROIHeads` slimmable, in place.

    Works for every subclass that keeps detectron2's attribute names; a cascade's ``box_head`` and
    ``box_predictor`` are ``ModuleList``s of its stages, which `make_slimmable_` walks like any
    module. Every ROIAlign becomes a `ParallelROIAlign` whatever ``slim`` is.

    Args:
        roi_heads (StandardROIHeads): the built heads.
        slim (dict or None): ``{"widths": [...], "divisor": int}``, or None to keep them stock.
    """
    use_parallel_roi_align_(roi_heads)
    if not slim:
        return
    make_slimmable_(roi_heads.box_head, **slim)
    # The predictor's outputs are classes and box deltas: it only follows its (slim) input.
    make_slimmable_(roi_heads.box_predictor, **slim, slim_out=False)
    if roi_heads.mask_on:
        make_slimmable_(roi_heads.mask_head, **slim, keep_out=("predictor",))
    if roi_heads.keypoint_on:
        make_slimmable_(roi_heads.keypoint_head, **slim, keep_out=("score_lowres",))


class _SlimROIHeadsMixin:
    """What the slim ROI heads add to a detectron2 ROI heads class: `make_roi_heads_slimmable_`
    after the stock ``__init__``, and the ``slim`` argument from the config."""

    @configurable
    def __init__(self, *, slim=None, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the heads
                slimmable, or None for the stock heads. Other arguments: those of the stock
                ROI heads class.
        """
        super().__init__(**kwargs)
        make_roi_heads_slimmable_(self, slim)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["slim"] = head_slim_settings(cfg)
        return ret


@ROI_HEADS_REGISTRY.register()
class SlimStandardROIHeads(_SlimROIHeadsMixin, StandardROIHeads):
    """detectron2's `StandardROIHeads` whose box, mask and keypoint heads slim with scope "all".

    With either scope its poolers run `slim_det.roi_align.ParallelROIAlign`: on CPU every thread
    works on ROIAlign (forward and backward), with torchvision's results bit for bit; so every
    model built from a slim config (training, evaluation, predictors, benchmarks) has it.
    """


@ROI_HEADS_REGISTRY.register()
class SlimCascadeROIHeads(_SlimROIHeadsMixin, CascadeROIHeads):
    """detectron2's `CascadeROIHeads` (Cascade R-CNN) that slims as `SlimStandardROIHeads`.

    With scope "all" the box head of every stage slims and every stage's predictor keeps its
    outputs; the mask and keypoint heads, if any, slim as in `SlimStandardROIHeads`. The poolers
    run `ParallelROIAlign` with either scope.
    """


@SEM_SEG_HEADS_REGISTRY.register()
class SlimSemSegFPNHead(SemSegFPNHead):
    """detectron2's `SemSegFPNHead` (Panoptic FPN's semantic branch), slimmable with scope "all".

    The per-level convs slim (their outputs are summed across levels, so they share one channel
    count) and the 1x1 ``predictor`` keeps its class outputs. Their ``CONVS_DIM`` channels are not
    the FPN's, so `MODEL.SLIM.FPN_MIN_WIDTH` does not floor them (as for the ROI heads).
    """

    @configurable
    def __init__(self, input_shape, *, slim=None, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the head
                slimmable, or None for the stock head. Other arguments: see `SemSegFPNHead`.
        """
        super().__init__(input_shape, **kwargs)
        if slim:
            make_slimmable_(self, **slim, keep_out=("predictor",))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["slim"] = head_slim_settings(cfg)
        return ret
