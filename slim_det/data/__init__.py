"""Datasets bundled with slim_det (currently the generated "shapes" set)."""
from .shapes import (
    SHAPES_KEYPOINT_FLIP_MAP,
    SHAPES_KEYPOINT_NAMES,
    SHAPES_KEYPOINT_OKS_SIGMAS,
    ensure_shapes,
    generate_shapes,
    register_shapes,
)
from .shapes_panoptic import ensure_shapes_panoptic, generate_shapes_panoptic

__all__ = [
    "SHAPES_KEYPOINT_FLIP_MAP",
    "SHAPES_KEYPOINT_NAMES",
    "SHAPES_KEYPOINT_OKS_SIGMAS",
    "ensure_shapes",
    "ensure_shapes_panoptic",
    "generate_shapes",
    "generate_shapes_panoptic",
    "register_shapes",
]
