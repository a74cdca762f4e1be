"""End to end: one slim Mask R-CNN trained from scratch learns at every width."""
import torch
from detectron2.utils.env import seed_all_rng

from slim_det.engine import SlimTrainer
from tests.engine_helpers import shapes_cfg

LEARNING_OPTS = {
    "SOLVER.IMS_PER_BATCH": 8,
    "SOLVER.BASE_LR": 0.01,
    "SOLVER.MAX_ITER": 190,
    "SOLVER.WARMUP_ITERS": 30,
    "SOLVER.STEPS": (160,),
    "TEST.EVAL_PERIOD": 0,
    "INPUT.MIN_SIZE_TRAIN": (96,),
    "INPUT.MAX_SIZE_TRAIN": 96,
    "INPUT.MIN_SIZE_TEST": 96,
    "INPUT.MAX_SIZE_TEST": 96,
}


def test_mask_rcnn_learns_at_every_width(tmp_path):
    cfg = shapes_cfg("mask", tmp_path, tiny_data=False, **LEARNING_OPTS)
    seed_all_rng(cfg.SEED)
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = SlimTrainer.test(cfg, trainer.model)
    trainer.train()
    after = trainer._last_eval_results
    print({w: (before[w]["bbox"]["AP50"], after[w]["bbox"]["AP50"], after[w]["segm"]["AP50"])
           for w in after})
    for width in ("w1", "w0.75", "w0.5", "w0.25"):
        untrained = torch.nan_to_num(torch.tensor(before[width]["bbox"]["AP50"])).item()
        assert after[width]["bbox"]["AP50"] >= untrained + 25, (width, before[width], after[width])
        assert after[width]["segm"]["AP50"] >= 20, (width, after[width])
