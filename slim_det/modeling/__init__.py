"""Slimmable detectron2 components; importing registers them."""
from .backbone import build_slim_resnet_backbone, build_slim_resnet_fpn_backbone
from .heads import SlimRPNHead, SlimStandardROIHeads
