"""Configs and runners for the training / evaluation tests."""
import json
import os

import torch
from detectron2.config import get_cfg
from detectron2.utils.env import seed_all_rng

import slim_det
from slim_det.engine import SlimTrainer
from tests.helpers import CONFIGS


def shapes_cfg(task="mask", output_dir=None, tiny=True, tiny_data=True, **opts):
    """A configs/shapes/ leaf config (``slim_{task}_rcnn_shapes.yaml``, or
    ``slim_{task}_shapes.yaml`` as for "retinanet" and "panoptic_fpn"), shrunk by
    configs/tests/tiny.yaml when ``tiny``; with ``tiny_data`` too, on the 16 / 8 image datasets."""
    cfg = slim_det.add_slim_config(get_cfg())
    path = os.path.join(CONFIGS, "shapes", f"slim_{task}_rcnn_shapes.yaml")
    if not os.path.isfile(path):
        path = os.path.join(CONFIGS, "shapes", f"slim_{task}_shapes.yaml")
    cfg.merge_from_file(path)
    if tiny:
        cfg.merge_from_file(os.path.join(CONFIGS, "tests", "tiny.yaml"))
    if tiny and tiny_data:
        rename = lambda names: tuple(n.replace("shapes_", "shapes_tiny_") for n in names)  # noqa
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = rename(cfg.DATASETS.TRAIN), rename(cfg.DATASETS.TEST)
    for key, value in opts.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    if output_dir is not None:
        cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def train(cfg, resume=False):
    """Train with SlimTrainer in this process; return the trainer."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_all_rng(cfg.SEED)  # as tools/train_net.py's default_setup does
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def state_of(model):
    model = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0 if atol == 0 else 1e-4, atol=atol,
                                       msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key
