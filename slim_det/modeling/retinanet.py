"""RetinaNet whose head slims with MODEL.SLIM.SCOPE "all" and is stock with "backbone".

detectron2 builds `RetinaNetHead` inside `RetinaNet.from_config`, from no registry, so the slim
head comes with its own meta-architecture: ``MODEL.META_ARCHITECTURE: "SlimRetinaNet"`` builds
detectron2's RetinaNet unchanged and then makes its head slimmable in place, as the other slim
heads do. Its state dict is RetinaNet's, so stock checkpoints load as they are.
"""
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from ..config import fpn_min_width
from ..layers import make_slimmable_
from .heads import head_slim_settings

__all__ = ["SlimRetinaNet", "make_retinanet_head_slimmable_"]


def make_retinanet_head_slimmable_(head, slim, min_width=0.0):
    """Make a built `RetinaNetHead` slimmable, in place.

    Args:
        head (RetinaNetHead): the built head.
        slim (dict): ``{"widths": [...], "divisor": int}``, as `make_slimmable_` takes them.
        min_width (float): MODEL.SLIM.FPN_MIN_WIDTH. The subnet convs are as wide as the FPN in
            the stock head (``conv_dims`` is the input's channels), so they keep the FPN's floor:
            a narrow model is still a stock RetinaNet of a narrower FPN.
    """
    for subnet in (head.cls_subnet, head.bbox_subnet):
        make_slimmable_(subnet, **slim, min_width=min_width)
    # The predictors' outputs are anchors x classes and anchors x 4 deltas: they stay full.
    make_slimmable_(head, **slim, keep_out=("cls_score", "bbox_pred"))
    return head


@META_ARCH_REGISTRY.register()
class SlimRetinaNet(RetinaNet):
    """detectron2's `RetinaNet` whose head slims with scope "all".

    The classification and box subnets' convs slim (never below ``MODEL.SLIM.FPN_MIN_WIDTH``),
    ``cls_score`` and ``bbox_pred`` read the slim features and keep their full outputs. With scope
    "backbone" it is exactly `RetinaNet`. Use it with a slim RetinaNet backbone such as
    ``build_slim_retinanet_resnet_fpn_backbone``.
    """

    @configurable
    def __init__(self, *, slim=None, fpn_min_width=0.0, **kwargs):
        """
        Args:
            slim (dict or None): ``{"widths": [...], "divisor": int}`` to make the head
                slimmable, or None for the stock head.
            fpn_min_width (float): MODEL.SLIM.FPN_MIN_WIDTH, the floor of the subnet convs.
            Other arguments: see `RetinaNet`.
        """
        super().__init__(**kwargs)
        if slim:
            make_retinanet_head_slimmable_(self.head, slim, fpn_min_width)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["slim"] = head_slim_settings(cfg)
        ret["fpn_min_width"] = fpn_min_width(cfg)
        return ret
