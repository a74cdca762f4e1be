"""The evaluators of a dataset, as detectron2's ``tools/train_net.py`` builds them."""
import importlib.util
import logging

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["build_evaluator", "coco_tasks"]


def coco_tasks(cfg):
    """The COCO tasks the model predicts: boxes, and masks / keypoints when the config has them."""
    return ("bbox",) + ("segm",) * cfg.MODEL.MASK_ON + ("keypoints",) * cfg.MODEL.KEYPOINT_ON


def _load_sem_seg(filename, dtype=None):
    """A semantic label PNG as an array: `SemSegEvaluator`'s default loader asks numpy for it
    with ``copy=False``, which numpy 2 refuses when the data type changes."""
    with PathManager.open(filename, "rb") as f:
        return np.array(Image.open(f), dtype=dtype)


def _panoptic_evaluator(dataset_name, output_folder):
    # COCOPanopticEvaluator imports panopticapi only when it runs (scripts/setup_env.sh installs
    # it): without it, keep the other tasks' results rather than lose the whole evaluation.
    if importlib.util.find_spec("panopticapi") is None:
        logging.getLogger(__name__).warning(
            f"Panoptic quality of {dataset_name} not evaluated: COCOPanopticEvaluator needs the "
            "panopticapi package (pip install --no-deps panopticapi-lite).")
        return None
    return COCOPanopticEvaluator(dataset_name, output_folder)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator(s) of ``dataset_name`` by its metadata's ``evaluator_type``, as detectron2's
    ``tools/train_net.py`` builds them: "coco", "sem_seg", "coco_panoptic_seg" (semantic, COCO and
    panoptic evaluators combined), "cityscapes_instance", "cityscapes_sem_seg", "pascal_voc",
    "lvis".

    The COCO evaluator is given the tasks of `coco_tasks` and the config's keypoint OKS sigmas.
    Panoptic quality needs the ``panopticapi`` package; without it a warning says it is skipped.

    Raises:
        NotImplementedError: for a dataset of another type (or none), naming it.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    evaluators = []
    if evaluator_type in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                          sem_seg_loading_fn=_load_sem_seg))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        evaluators.append(COCOEvaluator(dataset_name, tasks=coco_tasks(cfg),
                                        output_dir=output_folder,
                                        kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS))
    if evaluator_type == "coco_panoptic_seg":
        evaluators.append(_panoptic_evaluator(dataset_name, output_folder))
    if evaluator_type == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if evaluator_type == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    evaluators = [e for e in evaluators if e is not None]
    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for the dataset {dataset_name} with the type {evaluator_type!r}.")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
