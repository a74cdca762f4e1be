"""slim_det: slimmable neural networks (S-Nets) for detectron2.

Importing the package registers the slimmable backbones and heads with detectron2.
"""
from .calibration import calibrate_norms
from .channels import channel_groups, get_channels, load_channels, set_channels
from .config import add_slim_config
from .layers import make_slimmable_
from .modeling import (
    SlimCascadeROIHeads,
    SlimRetinaNet,
    SlimRPN,
    SlimRPNHead,
    SlimSemSegFPNHead,
    SlimStandardROIHeads,
    build_slim_resnet_backbone,
    build_slim_resnet_fpn_backbone,
)
from .width import active_channels, get_width, make_divisible, set_width, using_width

__version__ = "0.1.0"

from .data import register_shapes as _register_shapes
from .data.shapes import LARGE_VAL_SPLITS as _LARGE_VAL_SPLITS
from .data.shapes import default_root as _shapes_root

# Like detectron2's builtin COCO names, the generated "shapes" sets are registered on import (under
# $DETECTRON2_DATASETS/shapes); their files are generated the first time a set is loaded. Each
# split also has its panoptic sets (shapes_train_panoptic_separated, ..._panoptic_stuffonly).
_register_shapes()
# A 16 / 8 image version for smoke tests of a config (shapes_tiny_train, shapes_tiny_kp_val, ...).
_register_shapes(prefix="shapes_tiny", splits={"train": (16, 0), "val": (8, 1)},
                 root=_shapes_root() + "_tiny")
# 300 more validation images (shapes_val_large, shapes_kp_val_large) with their own seed, in their
# own folder (a root's stamp covers all its splits), for benchmarks/fidelity.py.
_register_shapes(prefix="shapes", splits=_LARGE_VAL_SPLITS, root=_shapes_root() + "_val_large")
