"""Tests for the generated "shapes" dataset and its detectron2 registration."""
import copy
import filecmp
import json
import os
import uuid

import numpy as np
import pytest
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.structures import Instances, PolygonMasks

from slim_det.data import (
    SHAPES_KEYPOINT_FLIP_MAP,
    SHAPES_KEYPOINT_NAMES,
    SHAPES_KEYPOINT_OKS_SIGMAS,
    ensure_shapes,
    register_shapes,
)
from slim_det.data.shapes import generate_shapes

# Small splits keep the whole module to about a second.
SPLITS = {"train": (6, 0), "val": (4, 1)}
SIZE = 96


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_shapes(str(tmp_path_factory.mktemp("shapes")), SPLITS, SIZE)


@pytest.fixture(scope="module")
def names(root):
    # Catalogs are process-global: a unique prefix avoids clashes across tests.
    prefix = "tmpshapes_" + uuid.uuid4().hex[:8]
    registered = register_shapes(root, prefix=prefix, splits=SPLITS, image_size=SIZE)
    assert len(registered) == 8  # per split: instances, keypoints, panoptic, semantic
    return {
        "train": f"{prefix}_train",
        "val": f"{prefix}_val",
        "kp_train": f"{prefix}_kp_train",
        "kp_val": f"{prefix}_kp_val",
    }


def _load(root, kind, split):
    with open(os.path.join(root, "annotations", f"{kind}_{split}.json")) as f:
        return json.load(f)


def test_generation_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for r in (a, b):
        generate_shapes(r, "train", num_images=3, image_size=SIZE, seed=7)
    for kind in ("instances", "keypoints"):
        name = os.path.join("annotations", f"{kind}_train.json")
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)
    files = sorted(os.listdir(os.path.join(a, "train")))
    assert len(files) == 3
    _, mismatch, errors = filecmp.cmpfiles(
        os.path.join(a, "train"), os.path.join(b, "train"), files, shallow=False
    )
    assert not mismatch and not errors

    generate_shapes(str(tmp_path / "c"), "train", num_images=3, image_size=SIZE, seed=8)
    other = _load(str(tmp_path / "c"), "instances", "train")
    assert other["annotations"] != _load(a, "instances", "train")["annotations"]


def test_ensure_shapes_reuses_and_regenerates(tmp_path):
    root = str(tmp_path)
    splits = {"val": (2, 1)}
    ensure_shapes(root, splits, SIZE)
    path = os.path.join(root, "annotations", "instances_val.json")
    mtime = os.stat(path).st_mtime_ns
    ensure_shapes(root, splits, SIZE)
    assert os.stat(path).st_mtime_ns == mtime

    ensure_shapes(root, {"val": (3, 1)}, SIZE)
    assert len(_load(root, "instances", "val")["images"]) == 3
    assert len(os.listdir(os.path.join(root, "val"))) == 3


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_instances_json_is_valid_coco(root, split):
    coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
    assert len(coco.getImgIds()) == SPLITS[split][0]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
    assert coco.getCatIds() == [1, 2, 3]

    for img_id in coco.getImgIds():
        img = coco.loadImgs(img_id)[0]
        assert (img["width"], img["height"]) == (SIZE, SIZE)
        assert os.path.isfile(os.path.join(root, split, img["file_name"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 4
        coverage = np.zeros((SIZE, SIZE), np.int32)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 1 and h > 1 and ann["area"] > 0 and ann["iscrowd"] == 0
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            (poly,) = ann["segmentation"]
            pts = np.asarray(poly).reshape(-1, 2)
            assert len(pts) >= 3
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            np.testing.assert_allclose([*lo, *(hi - lo)], ann["bbox"], atol=1.0)
            mask = coco.annToMask(ann)
            assert mask.sum() > 0
            coverage += mask
        # Objects never overlap, so every polygon is fully visible.
        assert coverage.max() <= 1


def test_keypoints_json(root):
    data = _load(root, "keypoints", "train")
    (cat,) = data["categories"]
    assert cat["id"] == 1 and cat["name"] == "shape"
    assert cat["keypoints"] == list(SHAPES_KEYPOINT_NAMES) and cat["skeleton"] == []
    assert len(SHAPES_KEYPOINT_OKS_SIGMAS) == 4
    assert data["images"] == _load(root, "instances", "train")["images"]

    coco = COCO(os.path.join(root, "annotations", "keypoints_train.json"))
    assert len(coco.getAnnIds()) == len(data["annotations"])
    for ann in data["annotations"]:
        assert ann["category_id"] == 1 and ann["num_keypoints"] == 4
        kps = np.asarray(ann["keypoints"], float).reshape(4, 3)
        assert (kps[:, 2] == 2).all()
        # Stored as pixel indices (0.5 below continuous coordinates).
        xy = kps[:, :2] + 0.5
        x, y, w, h = ann["bbox"]
        assert (xy[:, 0] >= x - 1e-6).all() and (xy[:, 0] <= x + w + 1e-6).all()
        assert (xy[:, 1] >= y - 1e-6).all() and (xy[:, 1] <= y + h + 1e-6).all()
        top, bottom, left, right = xy
        np.testing.assert_allclose(
            [top[1], bottom[1], left[0], right[0]], [y, y + h, x, x + w], atol=1e-6
        )


def test_registered_datasets_load(root, names):
    dicts = DatasetCatalog.get(names["train"])
    assert len(dicts) == SPLITS["train"][0]
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2}

    meta = MetadataCatalog.get(names["train"])
    assert meta.thing_classes == ["circle", "square", "triangle"]
    assert meta.evaluator_type == "coco"
    assert meta.json_file == os.path.join(root, "annotations", "instances_train.json")
    assert meta.image_root == os.path.join(root, "train")

    kp_dicts = DatasetCatalog.get(names["kp_val"])
    assert len(kp_dicts) == SPLITS["val"][0]
    kp_meta = MetadataCatalog.get(names["kp_val"])
    assert kp_meta.thing_classes == ["shape"]
    assert kp_meta.keypoint_names == list(SHAPES_KEYPOINT_NAMES)
    assert kp_meta.keypoint_flip_map == list(SHAPES_KEYPOINT_FLIP_MAP)
    assert all(a in SHAPES_KEYPOINT_NAMES for a, b, _ in kp_meta.keypoint_connection_rules)
    for d in kp_dicts:
        for ann in d["annotations"]:
            # After load_coco_json's +0.5 the keypoints sit on polygon vertices.
            kps = np.asarray(ann["keypoints"]).reshape(4, 3)
            verts = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            dist = np.abs(kps[:, None, :2] - verts[None]).sum(-1).min(axis=1)
            np.testing.assert_allclose(dist, 0, atol=1e-6)


def test_registration_is_idempotent_and_lazy(tmp_path, names):
    assert register_shapes(str(tmp_path), prefix=names["train"].rsplit("_", 1)[0]) == []

    # A fresh root is generated on the first DatasetCatalog.get.
    root = str(tmp_path / "lazy")
    prefix = "tmpshapes_" + uuid.uuid4().hex[:8]
    register_shapes(root, prefix=prefix, splits={"val": (2, 3)}, image_size=SIZE)
    assert not os.path.exists(root)
    assert len(DatasetCatalog.get(f"{prefix}_kp_val")) == 2
    assert os.path.isfile(os.path.join(root, "annotations", "keypoints_val.json"))


def test_keypoint_hflip_indices(names):
    flip = utils.create_keypoint_hflip_indices([names["kp_train"], names["kp_val"]])
    assert list(flip) == [0, 1, 3, 2]


def test_mapping_with_masks_and_keypoints(names):
    record = DatasetCatalog.get(names["kp_train"])[0]
    flip = utils.create_keypoint_hflip_indices([names["kp_train"]])

    # Same steps as DatasetMapper, minus augmentation; the transform step is
    # what reshapes the flat COCO keypoint list to (K, 3).
    annos = [
        utils.transform_instance_annotations(
            a, T.TransformList([]), (SIZE, SIZE), keypoint_hflip_indices=flip
        )
        for a in copy.deepcopy(record["annotations"])
    ]
    instances = utils.annotations_to_instances(annos, (SIZE, SIZE), mask_format="polygon")
    assert isinstance(instances.gt_masks, PolygonMasks)
    assert len(instances) == len(record["annotations"])
    assert instances.gt_keypoints.tensor.shape == (len(instances), 4, 3)

    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0)],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="polygon",
        use_keypoint=True,
        keypoint_hflip_indices=flip,
    )
    out = mapper(copy.deepcopy(record))
    assert tuple(out["image"].shape) == (3, SIZE, SIZE)
    inst = out["instances"]
    assert isinstance(inst, Instances) and len(inst) == len(record["annotations"])
    assert isinstance(inst.gt_masks, PolygonMasks)
    # Flipping swaps the left/right keypoints, so "left" stays left of "right".
    kps = inst.gt_keypoints.tensor
    assert (kps[:, 2, 0] <= kps[:, 3, 0]).all()
    boxes = inst.gt_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= SIZE).all()
