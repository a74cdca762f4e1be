"""A tiny, deterministic, COCO-format "shapes" dataset generated on demand.

The dataset lets the whole training / evaluation pipeline (boxes, masks and
keypoints) run end to end without downloading COCO. Every image holds 1-4
non-overlapping circles, squares and triangles on a textured background.

Layout under ``root`` (default ``$DETECTRON2_DATASETS/shapes``)::

    <root>/train/000001.png ...
    <root>/val/000001.png ...
    <root>/annotations/instances_{train,val}.json   # 3 classes, boxes + polygons
    <root>/annotations/keypoints_{train,val}.json   # 1 class "shape" + 4 keypoints
    <root>/.stamp.json                              # generator parameters

`slim_det.data.shapes_panoptic` adds panoptic and semantic annotations of the same images.

Coordinate conventions follow detectron2: polygons and boxes are continuous
coordinates (pixel ``i`` spans ``[i, i + 1)``), whereas COCO keypoints are
pixel indices, so keypoints are stored 0.5 px lower and land exactly on the
polygon's extreme vertices once ``load_coco_json`` adds 0.5 back.
"""

import contextlib
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np

try:  # fcntl is POSIX-only; without it we simply skip inter-process locking.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "CATEGORIES",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_SPLITS",
    "LARGE_VAL_SPLITS",
    "SHAPES_KEYPOINT_FLIP_MAP",
    "SHAPES_KEYPOINT_NAMES",
    "SHAPES_KEYPOINT_OKS_SIGMAS",
    "default_root",
    "ensure_shapes",
    "generate_shapes",
    "register_shapes",
]

# Bump whenever the generator's output changes so stale data is regenerated.
GENERATOR_VERSION = 1

CATEGORIES = ("circle", "square", "triangle")
DEFAULT_IMAGE_SIZE = 128
# split -> (num_images, seed)
DEFAULT_SPLITS: Dict[str, Tuple[int, int]] = {"train": (300, 0), "val": (50, 1)}
# A larger validation split for comparisons whose differences are smaller than the seed-to-seed
# noise on 50 images (benchmarks/fidelity.py). Its own seed keeps it apart from train and val.
LARGE_VAL_SPLITS: Dict[str, Tuple[int, int]] = {"val_large": (300, 2)}

SHAPES_KEYPOINT_NAMES = ("top", "bottom", "left", "right")
SHAPES_KEYPOINT_FLIP_MAP = (("left", "right"),)
# All four points are extreme vertices of simple convex shapes, so they are
# equally easy to localise and none deserves a looser tolerance; 0.05 sits
# between COCO's eye (0.025) and hip (0.107) sigmas.
SHAPES_KEYPOINT_OKS_SIGMAS = (0.05, 0.05, 0.05, 0.05)
# Outline the diamond through the extreme points when visualising.
SHAPES_KEYPOINT_CONNECTION_RULES = (
    ("top", "right", (255, 0, 0)),
    ("right", "bottom", (0, 255, 0)),
    ("bottom", "left", (0, 0, 255)),
    ("left", "top", (255, 255, 0)),
)

_MAX_OBJECTS = 4
_SIZE_RANGE = (0.2, 0.6)  # object extent as a fraction of the image side
_MARGIN = 1.0  # keep objects off the border so no keypoint sits on the edge
_GAP = 2  # px of background kept between objects, so masks never touch
_MIN_COLOR_DIST = 120.0  # RGB distance between object colour and background
_CIRCLE_VERTICES = 32  # multiple of 4 so the 4 extreme points are vertices
_SUBPIXEL_BITS = 4  # cv2 fixed-point shift used to rasterise float polygons
_STAMP = ".stamp.json"


def default_root() -> str:
    """Returns the default dataset root, honouring ``$DETECTRON2_DATASETS``."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "shapes")


# ----------------------------------------------------------------- drawing --
def _textured_background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Blends a gradient, blotchy noise and stripes around a random base colour."""
    base = rng.uniform(70, 185, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    gradient = rng.uniform(-25, 25) * (ramp - ramp.mean())

    cells = rng.randint(3, 9)
    coarse = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
    blotches = rng.uniform(5, 18) * cv2.resize(
        coarse, (size, size), interpolation=cv2.INTER_CUBIC
    )

    period = rng.uniform(6, 24) / size
    phase = rng.uniform(0, 2 * np.pi)
    stripe_angle = rng.uniform(0, np.pi)
    stripes = rng.uniform(0, 12) * np.sin(
        2 * np.pi * (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) / period
        + phase
    )

    texture = gradient[..., None] + blotches + stripes[..., None]
    return np.clip(base + texture, 0, 255).astype(np.float32)


def _distinct_color(rng: np.random.RandomState, background: np.ndarray) -> np.ndarray:
    """Samples an RGB colour far from the mean of ``background`` (N, 3) pixels."""
    mean = background.mean(axis=0)
    for _ in range(100):
        color = rng.randint(0, 256, size=3).astype(np.float32)
        if np.linalg.norm(color - mean) >= _MIN_COLOR_DIST:
            return color
    # Unreachable in practice for backgrounds in [70, 185]; keeps it total.
    return np.where(mean > 127, 0.0, 255.0).astype(np.float32)


def _unit_polygon(category: str, extent: float, angle: float) -> np.ndarray:
    """Returns an (N, 2) polygon centred on the origin."""
    if category == "circle":
        # Rotation is meaningless for a circle; a fixed start keeps the
        # extreme points on vertices.
        t = np.arange(_CIRCLE_VERTICES) * (2 * np.pi / _CIRCLE_VERTICES)
        return 0.5 * extent * np.stack([np.cos(t), np.sin(t)], axis=1)
    if category == "square":
        pts = 0.5 * extent * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    else:  # equilateral triangle with side `extent`, centred on its centroid
        t = np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
        pts = extent / np.sqrt(3) * np.stack([np.cos(t), np.sin(t)], axis=1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _rasterize(poly: np.ndarray, size: int, line_type: int) -> np.ndarray:
    """Fills ``poly`` into a uint8 mask (255 inside)."""
    mask = np.zeros((size, size), np.uint8)
    # cv2 treats integer coords as pixel centres, hence the -0.5 shift.
    fixed = np.round((poly - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 255, lineType=line_type, shift=_SUBPIXEL_BITS)
    return mask


def _sample_object(
    rng: np.random.RandomState, size: int, occupied: np.ndarray
) -> Optional[Tuple[int, np.ndarray, np.ndarray]]:
    """Tries to place one object that does not touch ``occupied``.

    Returns:
        ``(category_index, polygon, hard_mask)`` or None if no placement fit.
    """
    # Fix the class before retrying so that hard-to-fit classes (rotated
    # squares are the widest) are not under-represented.
    category = rng.randint(len(CATEGORIES))
    for _ in range(30):
        extent = rng.uniform(*_SIZE_RANGE) * size
        angle = rng.uniform(0, 2 * np.pi)
        poly = _unit_polygon(CATEGORIES[category], extent, angle)
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        free = (size - 2 * _MARGIN) - (hi - lo)
        if np.any(free < 0):
            continue
        offset = _MARGIN - lo + rng.uniform(0, 1, size=2) * free
        # Round once so the JSON, rasterisation and keypoints share geometry.
        poly = np.round(poly + offset, 2)
        mask = _rasterize(poly, size, cv2.LINE_8)
        if not np.any(mask & occupied):
            return category, poly, mask
    return None


def _render_image(rng: np.random.RandomState, size: int):
    """Draws one image.

    Returns:
        ``(rgb_uint8_image, [(category_index, polygon), ...])``.
    """
    background = _textured_background(rng, size)
    image = background.copy()
    occupied = np.zeros((size, size), np.uint8)
    kernel = np.ones((2 * _GAP + 1, 2 * _GAP + 1), np.uint8)
    objects = []
    for _ in range(rng.randint(1, _MAX_OBJECTS + 1)):
        placed = _sample_object(rng, size, occupied)
        if placed is None:
            continue
        category, poly, mask = placed
        occupied |= cv2.dilate(mask, kernel)
        alpha = _rasterize(poly, size, cv2.LINE_AA).astype(np.float32)[..., None] / 255
        # Contrast against the local background: gradients make the global
        # mean misleading. Mild jitter keeps the fill from being perfectly flat.
        base = _distinct_color(rng, background[mask > 0])
        color = base + rng.uniform(-8, 8, size=(size, size, 1))
        image = image * (1 - alpha) + color * alpha
        objects.append((category, poly))
    # Fine sensor-like noise over everything, objects included.
    image += rng.normal(0, 3, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


# -------------------------------------------------------------- annotation --
def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _annotation(ann_id: int, image_id: int, category_id: int, poly: np.ndarray) -> dict:
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
        "bbox": [round(float(v), 2) for v in (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])],
        "area": round(_polygon_area(poly), 2),
        "iscrowd": 0,
    }


def _extreme_keypoints(poly: np.ndarray) -> List[float]:
    """COCO keypoints [x, y, v] * 4 at the top/bottom/left/right vertices."""
    order = (
        np.argmin(poly[:, 1]),
        np.argmax(poly[:, 1]),
        np.argmin(poly[:, 0]),
        np.argmax(poly[:, 0]),
    )
    keypoints = []
    for i in order:
        # Subtract 0.5: COCO keypoints are pixel indices (see module docstring).
        x, y = poly[i] - 0.5
        keypoints += [round(float(x), 2), round(float(y), 2), 2]
    return keypoints


def _write_json(path: str, data: dict) -> None:
    """Writes atomically so a crash never leaves a truncated annotation file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, path)


def generate_shapes(
    root: str, split: str, num_images: int, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0
) -> Tuple[str, str]:
    """Generates one split: PNG images plus instance and keypoint COCO JSONs.

    Output is a pure function of the arguments: each image draws from its own
    ``RandomState([seed, index])`` (legacy streams are frozen across numpy
    versions), so a smaller split is also a prefix of a larger one.

    Args:
        root: Dataset root directory.
        split: Split name, used for the image folder and JSON names.
        num_images: Number of images to draw.
        image_size: Side of the square images in pixels.
        seed: Base random seed for this split.

    Returns:
        Paths of the instances JSON and the keypoints JSON.
    """
    image_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    # Drop images from a previous, possibly larger, generation.
    for name in os.listdir(image_dir):
        if name.endswith(".png"):
            os.remove(os.path.join(image_dir, name))

    images, instances, keypoints = [], [], []
    for index in range(num_images):
        rng = np.random.RandomState([seed, index])
        image, objects = _render_image(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image[..., ::-1])
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for category, poly in objects:
            ann_id = len(instances) + 1
            instances.append(_annotation(ann_id, image_id, category + 1, poly))
            kp_ann = _annotation(ann_id, image_id, 1, poly)
            kp_ann.update(keypoints=_extreme_keypoints(poly), num_keypoints=4)
            keypoints.append(kp_ann)

    info = {"description": f"slim_det shapes ({split})", "version": str(GENERATOR_VERSION)}
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)
    ]
    kp_categories = [
        {
            "id": 1,
            "name": "shape",
            "supercategory": "shape",
            "keypoints": list(SHAPES_KEYPOINT_NAMES),
            "skeleton": [],
        }
    ]
    instances_json = os.path.join(ann_dir, f"instances_{split}.json")
    keypoints_json = os.path.join(ann_dir, f"keypoints_{split}.json")
    _write_json(
        instances_json,
        {"info": info, "images": images, "annotations": instances, "categories": categories},
    )
    _write_json(
        keypoints_json,
        {"info": info, "images": images, "annotations": keypoints, "categories": kp_categories},
    )
    return instances_json, keypoints_json


# ------------------------------------------------------------ on-demand IO --
@contextlib.contextmanager
def _locked(root: str):
    """Serialises generation across processes (e.g. DDP ranks, loader workers)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def shapes_params(splits: Mapping[str, Tuple[int, int]], image_size: int) -> dict:
    """What the stamp records: the generator version and the arguments the data is a function of."""
    return {
        "version": GENERATOR_VERSION,
        "image_size": image_size,
        "splits": {k: list(v) for k, v in sorted(splits.items())},
    }


def _expected_files(root: str, splits: Mapping[str, Tuple[int, int]]) -> List[str]:
    files = []
    for split in splits:
        files.append(os.path.join(root, "annotations", f"instances_{split}.json"))
        files.append(os.path.join(root, "annotations", f"keypoints_{split}.json"))
    return files


def ensure_shapes(
    root: Optional[str] = None,
    splits: Optional[Mapping[str, Tuple[int, int]]] = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
) -> str:
    """Generates the dataset unless an up-to-date copy already exists.

    A stamp file records the generator version and parameters; any mismatch
    (or a missing annotation file) regenerates every split. Call this before
    building a ``COCOEvaluator``: its constructor opens the JSON file, which
    the lazy ``DatasetCatalog`` loader may not have produced yet.

    Args:
        root: Dataset root; defaults to :func:`default_root`.
        splits: Mapping ``split -> (num_images, seed)``; defaults to
            :data:`DEFAULT_SPLITS`.
        image_size: Side of the square images in pixels.
        force: Regenerate even if the stamp matches.

    Returns:
        The dataset root.
    """
    root = root or default_root()
    splits = dict(DEFAULT_SPLITS if splits is None else splits)

    def generate() -> None:
        for split, (num_images, seed) in sorted(splits.items()):
            generate_shapes(root, split, num_images, image_size, seed)

    ensure_stamped(root, _STAMP, shapes_params(splits, image_size),
                   _expected_files(root, splits), generate, force)
    return root


def ensure_stamped(
    root: str, stamp: str, params: dict, expected: List[str], generate, force: bool = False
) -> None:
    """Runs ``generate()`` unless the stamp file ``root/stamp`` records ``params`` and every file
    of ``expected`` exists; then writes the stamp.

    Other processes (DDP ranks, loader workers) wait on a lock rather than generate twice.
    """
    stamp_path = os.path.join(root, stamp)

    def up_to_date() -> bool:
        if force or not os.path.isfile(stamp_path):
            return False
        try:
            with open(stamp_path) as f:
                if json.load(f) != params:
                    return False
        except ValueError:  # unreadable stamp: treat as stale
            return False
        return all(os.path.isfile(p) for p in expected)

    if up_to_date():  # fast path without taking the lock
        return
    with _locked(root):
        if force or not up_to_date():  # another process may have just finished
            if os.path.isfile(stamp_path):
                os.remove(stamp_path)
            generate()
            # Written last so an interrupted run is detected and redone.
            _write_json(stamp_path, params)


# ------------------------------------------------------------ registration --
def register_shapes(
    root: Optional[str] = None,
    prefix: str = "shapes",
    splits: Optional[Mapping[str, Tuple[int, int]]] = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> List[str]:
    """Registers ``{prefix}_{split}`` and ``{prefix}_kp_{split}`` with detectron2, and the
    panoptic ``{prefix}_{split}_panoptic_separated`` / ``_panoptic_stuffonly`` (see
    `slim_det.data.shapes_panoptic`).

    Names already present in ``DatasetCatalog`` are skipped, so repeated calls
    are harmless. Nothing is generated here: the registered loaders call
    :func:`ensure_shapes` first. Evaluators need the JSON earlier, so call
    :func:`ensure_shapes` (same arguments) before building a ``COCOEvaluator``
    (``ensure_shapes_panoptic`` before a ``COCOPanopticEvaluator``).

    Args:
        root: Dataset root; defaults to :func:`default_root` at call time.
        prefix: Name prefix, so tests can register private copies.
        splits: Mapping ``split -> (num_images, seed)``; defaults to
            :data:`DEFAULT_SPLITS`.
        image_size: Side of the square images in pixels.

    Returns:
        The names newly registered by this call.
    """
    # Imported lazily so the generator works without detectron2 installed.
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = root or default_root()
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    registered = []

    def make_loader(json_file: str, image_root: str, name: str):
        def load():
            ensure_shapes(root, splits, image_size)
            return load_coco_json(json_file, image_root, name)

        return load

    for split in splits:
        image_root = os.path.join(root, split)
        variants = [
            (f"{prefix}_{split}", f"instances_{split}.json", {"thing_classes": list(CATEGORIES)}),
            (
                f"{prefix}_kp_{split}",
                f"keypoints_{split}.json",
                {
                    "thing_classes": ["shape"],
                    "keypoint_names": list(SHAPES_KEYPOINT_NAMES),
                    "keypoint_flip_map": list(SHAPES_KEYPOINT_FLIP_MAP),
                    "keypoint_connection_rules": list(SHAPES_KEYPOINT_CONNECTION_RULES),
                },
            ),
        ]
        for name, json_name, extra in variants:
            if name in DatasetCatalog.list():
                continue
            json_file = os.path.join(root, "annotations", json_name)
            DatasetCatalog.register(name, make_loader(json_file, image_root, name))
            # load_coco_json sets the same id map later; setting it now lets
            # evaluators built before the first load map ids back correctly.
            id_map = {i + 1: i for i in range(len(extra["thing_classes"]))}
            MetadataCatalog.get(name).set(
                json_file=json_file,
                image_root=image_root,
                evaluator_type="coco",
                thing_dataset_id_to_contiguous_id=id_map,
                **extra,
            )
            registered.append(name)
    from .shapes_panoptic import register_shapes_panoptic  # it imports this module

    return registered + register_shapes_panoptic(root, prefix, splits, image_size)
