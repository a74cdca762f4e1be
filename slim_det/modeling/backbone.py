"""Slimmable ResNet and ResNet-FPN backbones.

The builders build detectron2's own ResNet / FPN from the same config keys, then make them
slimmable in place, so every ResNet option behaves as in detectron2 and width 1.0 is the stock
backbone, parameter for parameter.
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import (
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..config import fpn_min_width, slim_settings
from ..layers import make_slimmable_


def _check_resnet_cfg(cfg):
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE must be all False for a slim ResNet: deformable "
            f"convs cannot be slimmed; got {list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)}."
        )
    if cfg.MODEL.RESNETS.NUM_GROUPS != 1:
        raise ValueError(
            "MODEL.RESNETS.NUM_GROUPS must be 1 for a slim ResNet (grouped convs cannot be "
            f"slimmed); got {cfg.MODEL.RESNETS.NUM_GROUPS}."
        )


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape):
    """A slimmable ResNet (depth 18/34/50/101) configured by ``MODEL.RESNETS.*``.

    Returns:
        detectron2.modeling.ResNet: the stock ResNet, made slimmable in place.
    """
    widths, _, divisor = slim_settings(cfg)
    _check_resnet_cfg(cfg)
    return make_slimmable_(build_resnet_backbone(cfg, input_shape), widths, divisor)


@BACKBONE_REGISTRY.register()
def build_slim_resnet_fpn_backbone(cfg, input_shape):
    """A slimmable ResNet with an FPN that slims according to ``MODEL.SLIM.SCOPE``.

    With scope "backbone" the FPN's lateral convs read the slim features (the exact, cheaper form
    of zero-padding them back to full width) and every FPN output stays full width; its norms, if
    any, still switch per width. With scope "all" the FPN outputs slim too, never below
    ``MODEL.SLIM.FPN_MIN_WIDTH``.

    Returns:
        detectron2.modeling.FPN: the stock FPN, made slimmable in place.
    """
    return _slim_fpn(cfg, input_shape, build_resnet_fpn_backbone)


@BACKBONE_REGISTRY.register()
def build_slim_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """RetinaNet's P3-P7 ResNet-FPN, slimmable: `build_slim_resnet_fpn_backbone`'s rules, and
    the P6 / P7 convs (which read res5) slim with the FPN under scope "all".

    Returns:
        detectron2.modeling.FPN: detectron2's `build_retinanet_resnet_fpn_backbone`, made
        slimmable in place.
    """
    return _slim_fpn(cfg, input_shape, build_retinanet_resnet_fpn_backbone)


def _slim_fpn(cfg, input_shape, build_stock):
    # Validate before building: detectron2 would fail deep inside on unsupported options.
    widths, scope, divisor = slim_settings(cfg)
    _check_resnet_cfg(cfg)
    fpn = build_stock(cfg, input_shape)
    make_slimmable_(fpn.bottom_up, widths, divisor)
    return make_slimmable_(fpn, widths, divisor, slim_out=(scope == "all"),
                           min_width=fpn_min_width(cfg))
