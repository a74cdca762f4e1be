"""Slimmable detectron2 components; importing registers them."""
from .backbone import (
    build_slim_resnet_backbone,
    build_slim_resnet_fpn_backbone,
    build_slim_retinanet_resnet_fpn_backbone,
)
from .heads import SlimCascadeROIHeads, SlimRPNHead, SlimSemSegFPNHead, SlimStandardROIHeads
from .mobilenet import (
    build_slim_mobilenet_v1_backbone,
    build_slim_mobilenet_v1_fpn_backbone,
    build_slim_mobilenet_v2_backbone,
    build_slim_mobilenet_v2_fpn_backbone,
    build_slim_retinanet_mobilenet_v1_fpn_backbone,
    build_slim_retinanet_mobilenet_v2_fpn_backbone,
)
from .proposals import SlimRPN
from .plain import add_fixed_channel_config, build_fixed_channel_backbone, freeze_width_
from .retinanet import SlimRetinaNet
