"""Panoptic and semantic annotations of the "shapes" dataset, in detectron2's COCO formats.

They are derived from the instance annotations of the same images, as detectron2's
``datasets/prepare_panoptic_fpn.py`` derives COCO's semantic annotations from its panoptic ones.
The things are the instance classes (circle, square, triangle); everything else is one stuff
class, "background" (the images have one textured background, nothing else a model could tell
apart). Layout under ``root`` (next to the images and instance annotations of `shapes`)::

    <root>/panoptic_{split}/000001.png        # COCO panoptic PNG: segment id = R + 256 G + 256^2 B
    <root>/panoptic_stuff_{split}/000001.png  # semantic labels, Panoptic FPN's "separated" form:
                                              # 0 any thing, 1 background (255 would be void)
    <root>/annotations/panoptic_{split}.json  # COCO panoptic JSON: segments_info per image
    <root>/.stamp_panoptic.json

Segment ids in an image: 1 the background, ``k + 1`` its ``k``-th instance annotation (in the
order of ``instances_{split}.json``). A thing's mask is its polygon rasterised by pycocotools,
as detectron2 and ``COCOEvaluator`` rasterise it; objects never touch, so no pixel is void.
"""
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

from .shapes import (
    CATEGORIES,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SPLITS,
    _write_json,
    default_root,
    ensure_shapes,
    ensure_stamped,
    shapes_params,
)

__all__ = [
    "STUFF_CATEGORIES",
    "ensure_shapes_panoptic",
    "generate_shapes_panoptic",
    "panoptic_paths",
    "register_shapes_panoptic",
]

# Bump whenever this module's output changes so stale annotations are regenerated. Its own stamp
# (and version) leaves the images and instance annotations alone: processes running older code
# keep reading them while these are added.
PANOPTIC_VERSION = 1
STUFF_CATEGORIES = ("background",)
BACKGROUND_SEGMENT_ID = 1
# The semantic label of every thing pixel in the "separated" annotations (detectron2's convention).
THINGS_LABEL = 0
VOID_LABEL = 255
_THING_COLORS = ((220, 20, 60), (0, 130, 230), (250, 170, 30))
_STUFF_COLORS = {"things": (82, 18, 128), "background": (128, 128, 128)}
_STAMP = ".stamp_panoptic.json"


def _categories() -> List[dict]:
    """COCO panoptic categories: the instance classes (same ids), then the stuff classes."""
    things = [{"id": i + 1, "name": name, "supercategory": "shape", "isthing": 1,
               "color": list(_THING_COLORS[i])} for i, name in enumerate(CATEGORIES)]
    stuff = [{"id": len(CATEGORIES) + i + 1, "name": name, "supercategory": "stuff", "isthing": 0,
              "color": list(_STUFF_COLORS[name])} for i, name in enumerate(STUFF_CATEGORIES)]
    return things + stuff


def panoptic_paths(root: str, split: str) -> Dict[str, str]:
    """``panoptic_json``, ``panoptic_root`` and ``sem_seg_root`` of ``split`` under ``root``."""
    return {
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}.json"),
        "panoptic_root": os.path.join(root, f"panoptic_{split}"),
        "sem_seg_root": os.path.join(root, f"panoptic_stuff_{split}"),
    }


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """panopticapi's ``id2rgb``: segment id ``R + 256 G + 256^2 B`` as an RGB image."""
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    for channel in range(3):
        rgb[..., channel] = (ids >> (8 * channel)) & 255
    return rgb


def _segment(segment_id: int, category_id: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": segment_id, "category_id": category_id, "iscrowd": 0, "area": int(mask.sum()),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]}


def _clear_pngs(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".png"):
            os.remove(os.path.join(folder, name))


def generate_shapes_panoptic(root: str, split: str) -> Dict[str, str]:
    """Writes the panoptic and semantic annotations of one generated split.

    Reads ``root/annotations/instances_{split}.json`` (see `slim_det.data.shapes`), so the output
    is a pure function of the instance annotations.

    Returns:
        The paths of `panoptic_paths`.
    """
    paths = panoptic_paths(root, split)
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        instances = json.load(f)
    by_image = {image["id"]: [] for image in instances["images"]}
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    _clear_pngs(paths["panoptic_root"])
    _clear_pngs(paths["sem_seg_root"])
    background_id = len(CATEGORIES) + 1
    annotations = []
    for image in instances["images"]:
        height, width = image["height"], image["width"]
        ids = np.full((height, width), BACKGROUND_SEGMENT_ID, np.int64)
        segments = []
        for k, ann in enumerate(by_image[image["id"]], start=1):
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], height, width))
            mask = mask_util.decode(rle).astype(bool)
            ids[mask] = BACKGROUND_SEGMENT_ID + k
            segments.append(_segment(BACKGROUND_SEGMENT_ID + k, ann["category_id"], mask))
        background = ids == BACKGROUND_SEGMENT_ID
        if background.any():
            segments.insert(0, _segment(BACKGROUND_SEGMENT_ID, background_id, background))
        semantic = np.where(background, 1, THINGS_LABEL).astype(np.uint8)
        png = os.path.splitext(image["file_name"])[0] + ".png"
        cv2.imwrite(os.path.join(paths["panoptic_root"], png), _id_to_rgb(ids)[..., ::-1])
        cv2.imwrite(os.path.join(paths["sem_seg_root"], png), semantic)
        annotations.append({"image_id": image["id"], "file_name": png, "segments_info": segments})
    info = dict(instances["info"], description=f"slim_det shapes panoptic ({split})")
    _write_json(paths["panoptic_json"], {"info": info, "images": instances["images"],
                                         "annotations": annotations, "categories": _categories()})
    return paths


def ensure_shapes_panoptic(
    root: Optional[str] = None,
    splits: Optional[Mapping[str, Tuple[int, int]]] = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
) -> str:
    """`ensure_shapes`, then the panoptic and semantic annotations unless they are up to date.

    Args: as `slim_det.data.ensure_shapes`.

    Returns:
        The dataset root.
    """
    root = root or default_root()
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    ensure_shapes(root, splits, image_size)
    params = {"version": PANOPTIC_VERSION, "shapes": shapes_params(splits, image_size)}
    expected = [panoptic_paths(root, split)["panoptic_json"] for split in splits]

    def generate() -> None:
        for split in sorted(splits):
            generate_shapes_panoptic(root, split)

    ensure_stamped(root, _STAMP, params, expected, generate, force)
    return root


def panoptic_metadata() -> dict:
    """The metadata detectron2's builtin "coco_panoptic_separated" sets, for the shapes classes.

    The semantic classes are "things" (label 0, every thing pixel) and then the stuff classes.
    """
    categories = _categories()
    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    stuff_ids = {c["id"]: i + 1 for i, c in enumerate(stuff)}
    stuff_ids[0] = THINGS_LABEL
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_classes": ["things"] + [c["name"] for c in stuff],
        "stuff_colors": [list(_STUFF_COLORS["things"])] + [c["color"] for c in stuff],
        "stuff_dataset_id_to_contiguous_id": stuff_ids,
    }


def register_shapes_panoptic(
    root: str, prefix: str, splits: Mapping[str, Tuple[int, int]], image_size: int
) -> List[str]:
    """Registers ``{prefix}_{split}_panoptic_separated`` and ``..._panoptic_stuffonly``.

    They are registered by detectron2's `register_coco_panoptic_separated`, as Panoptic FPN's COCO
    sets are: the first holds the instance annotations and the semantic labels (evaluator type
    "coco_panoptic_seg"), the second the semantic labels only ("sem_seg"). Their loaders then
    generate the data first and match the ``.png`` images (detectron2's assume COCO's ``.jpg``).

    Returns:
        The names newly registered by this call.
    """
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import (
        load_coco_json,
        load_sem_seg,
        register_coco_panoptic_separated,
    )
    from detectron2.data.datasets.coco_panoptic import merge_to_panoptic

    def ensure():
        ensure_shapes_panoptic(root, splits, image_size)

    def loaders(name, instances_json, image_root, sem_seg_root):
        def separated():
            ensure()
            return merge_to_panoptic(load_coco_json(instances_json, image_root, name),
                                     load_sem_seg(sem_seg_root, image_root, image_ext="png"))

        def stuff_only():
            ensure()
            return load_sem_seg(sem_seg_root, image_root, image_ext="png")

        return separated, stuff_only

    registered = []
    for split in splits:
        base = f"{prefix}_{split}_panoptic"
        names = (base + "_separated", base + "_stuffonly")
        if names[0] in DatasetCatalog.list():
            continue
        paths = panoptic_paths(root, split)
        instances_json = os.path.join(root, "annotations", f"instances_{split}.json")
        image_root = os.path.join(root, split)
        register_coco_panoptic_separated(
            base, panoptic_metadata(), image_root, paths["panoptic_root"], paths["panoptic_json"],
            paths["sem_seg_root"], instances_json,
        )
        for name, loader in zip(names, loaders(names[0], instances_json, image_root,
                                               paths["sem_seg_root"])):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, loader)
        registered += names
    return registered
