"""The panoptic and semantic annotations of the generated "shapes" dataset: they agree with the
instance annotations, load through detectron2's registration, and detectron2's evaluators score
the ground truth itself as perfect."""
import filecmp
import json
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO

from slim_det.data import ensure_shapes_panoptic, generate_shapes, generate_shapes_panoptic
from slim_det.data import register_shapes
from slim_det.data.shapes_panoptic import panoptic_paths
from slim_det.engine.evaluators import build_evaluator

SPLITS = {"train": (4, 0), "val": (4, 1)}
SIZE = 96


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_shapes_panoptic(str(tmp_path_factory.mktemp("shapes")), SPLITS, SIZE)


@pytest.fixture(scope="module")
def prefix(root):
    prefix = "tmppanoptic_" + uuid.uuid4().hex[:8]  # catalogs are process-global
    register_shapes(root, prefix=prefix, splits=SPLITS, image_size=SIZE)
    return prefix


def _ids(path):
    """A COCO panoptic PNG's segment ids (R + 256 G + 256^2 B)."""
    rgb = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_panoptic_and_semantic_annotations_agree_with_the_instances(root, split):
    paths = panoptic_paths(root, split)
    coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
    with open(paths["panoptic_json"]) as f:
        panoptic = json.load(f)
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert [(c["name"], c["isthing"]) for c in categories.values()] == [
        ("circle", 1), ("square", 1), ("triangle", 1), ("background", 0)]
    assert panoptic["images"] == coco.dataset["images"]
    assert len(panoptic["annotations"]) == SPLITS[split][0]
    for ann in panoptic["annotations"]:
        ids = _ids(os.path.join(paths["panoptic_root"], ann["file_name"]))
        semantic = cv2.imread(os.path.join(paths["sem_seg_root"], ann["file_name"]),
                              cv2.IMREAD_UNCHANGED)
        assert ids.shape == semantic.shape == (SIZE, SIZE)
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids)) == set(segments)  # no void pixel, no segment without pixels
        instances = coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"]))
        assert [s["category_id"] for s in ann["segments_info"]] == [4] + [
            a["category_id"] for a in instances]
        for k, instance in enumerate(instances, start=1):
            mask = coco.annToMask(instance).astype(bool)
            np.testing.assert_array_equal(ids == segments[k + 1]["id"], mask)
            assert segments[k + 1]["area"] == mask.sum()
        background = ids == 1
        assert segments[1]["area"] == background.sum() > 0
        # Panoptic FPN's "separated" labels: 0 for every thing pixel, 1 for the background.
        np.testing.assert_array_equal(semantic, np.where(background, 1, 0))


def test_generation_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for r in (a, b):
        generate_shapes(r, "val", num_images=3, image_size=SIZE, seed=5)
        generate_shapes_panoptic(r, "val")
    pa, pb = panoptic_paths(a, "val"), panoptic_paths(b, "val")
    assert filecmp.cmp(pa["panoptic_json"], pb["panoptic_json"], shallow=False)
    for folder in ("panoptic_root", "sem_seg_root"):
        files = sorted(os.listdir(pa[folder]))
        assert len(files) == 3
        _, mismatch, errors = filecmp.cmpfiles(pa[folder], pb[folder], files, shallow=False)
        assert not mismatch and not errors


def test_registered_like_detectron2s_coco_panoptic_and_generated_lazily(root, prefix, tmp_path):
    separated = f"{prefix}_train_panoptic_separated"
    dicts = DatasetCatalog.get(separated)
    instances = DatasetCatalog.get(f"{prefix}_train")
    assert [d["file_name"] for d in dicts] == [d["file_name"] for d in instances]
    assert [d["annotations"] for d in dicts] == [d["annotations"] for d in instances]
    assert all(os.path.isfile(d["sem_seg_file_name"]) for d in dicts)
    meta = MetadataCatalog.get(separated)
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.stuff_classes == ["things", "background"]
    assert meta.thing_classes == ["circle", "square", "triangle"]
    assert meta.panoptic_json == panoptic_paths(root, "train")["panoptic_json"]
    assert MetadataCatalog.get(f"{prefix}_val_panoptic_stuffonly").evaluator_type == "sem_seg"
    assert len(DatasetCatalog.get(f"{prefix}_val_panoptic_stuffonly")) == SPLITS["val"][0]

    lazy_root, lazy = str(tmp_path / "lazy"), "tmppanoptic_" + uuid.uuid4().hex[:8]
    register_shapes(lazy_root, prefix=lazy, splits={"val": (2, 3)}, image_size=SIZE)
    assert not os.path.exists(lazy_root)
    assert len(DatasetCatalog.get(f"{lazy}_val_panoptic_separated")) == 2
    assert os.path.isfile(panoptic_paths(lazy_root, "val")["panoptic_json"])


def _perfect_outputs(record, meta):
    """What a perfect Panoptic FPN would output for one image of the dataset."""
    ids = torch.as_tensor(_ids(record["pan_seg_file_name"]))
    size = ids.shape
    with open(record["panoptic_json"]) as f:
        ann = next(a for a in json.load(f)["annotations"] if a["image_id"] == record["image_id"])
    segments, masks = [], []
    thing_ids = meta.thing_dataset_id_to_contiguous_id
    for segment in ann["segments_info"]:
        isthing = segment["category_id"] in thing_ids
        category = (thing_ids if isthing else meta.stuff_dataset_id_to_contiguous_id)[
            segment["category_id"]]
        segments.append({"id": segment["id"], "category_id": category, "isthing": isthing})
        if isthing:
            masks.append((ids == segment["id"], category))
    instances = Instances(size)
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in record["annotations"]]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.ones(len(boxes))
    instances.pred_classes = torch.tensor([c for _, c in masks])
    instances.pred_masks = torch.stack([m for m, _ in masks])
    semantic = torch.as_tensor(cv2.imread(record["sem_seg_file_name"], cv2.IMREAD_UNCHANGED))
    sem_seg = torch.nn.functional.one_hot(semantic.long(), 2).permute(2, 0, 1).float()
    return {"instances": instances, "sem_seg": sem_seg, "panoptic_seg": (ids, segments)}


def test_detectron2s_evaluators_score_the_ground_truth_as_perfect(prefix, tmp_path):
    name = f"{prefix}_val_panoptic_separated"
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    evaluator = build_evaluator(cfg, name, str(tmp_path))
    assert isinstance(evaluator, DatasetEvaluators)
    assert [type(e) for e in evaluator._evaluators] == [
        SemSegEvaluator, COCOEvaluator, COCOPanopticEvaluator]
    meta = MetadataCatalog.get(name)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        ids_file = os.path.join(meta.panoptic_root, os.path.basename(record["sem_seg_file_name"]))
        record = dict(record, pan_seg_file_name=ids_file, panoptic_json=meta.panoptic_json)
        inputs = {"file_name": record["file_name"], "image_id": record["image_id"],
                  "height": SIZE, "width": SIZE}
        evaluator.process([inputs], [_perfect_outputs(record, meta)])
    results = evaluator.evaluate()
    assert results["sem_seg"]["mIoU"] == pytest.approx(100)
    assert results["bbox"]["AP"] == pytest.approx(100)
    assert results["segm"]["AP"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ_st"] == pytest.approx(100)
