"""slim_det: slimmable neural networks (S-Nets) for detectron2.

Importing the package registers the slimmable backbones and heads with detectron2.
"""
from .config import add_slim_config
from .layers import make_slimmable_
from .modeling import (
    SlimRPNHead,
    SlimStandardROIHeads,
    build_slim_resnet_backbone,
    build_slim_resnet_fpn_backbone,
)
from .width import active_channels, get_width, make_divisible, set_width, using_width

__version__ = "0.1.0"

from .data import register_shapes as _register_shapes

# Like detectron2's builtin COCO names, the generated "shapes" sets are registered on import (under
# $DETECTRON2_DATASETS/shapes); their files are generated the first time a set is loaded.
_register_shapes()
