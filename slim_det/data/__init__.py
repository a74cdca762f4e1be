"""Datasets bundled with slim_det (currently the generated "shapes" set)."""
from .shapes import (
    SHAPES_KEYPOINT_FLIP_MAP,
    SHAPES_KEYPOINT_NAMES,
    SHAPES_KEYPOINT_OKS_SIGMAS,
    ensure_shapes,
    generate_shapes,
    register_shapes,
)

__all__ = [
    "SHAPES_KEYPOINT_FLIP_MAP",
    "SHAPES_KEYPOINT_NAMES",
    "SHAPES_KEYPOINT_OKS_SIGMAS",
    "ensure_shapes",
    "generate_shapes",
    "register_shapes",
]
