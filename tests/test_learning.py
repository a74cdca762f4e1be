"""End to end: one slim Mask R-CNN trained from scratch learns at every width, on any seed.

The seed is new every run (never pinned, so the test cannot pass by luck of one seed) and is
printed; replay a failure with ``SLIM_DET_TEST_SEED=<seed> make test``.
"""
import os
import random

import torch
from detectron2.utils.env import seed_all_rng

from slim_det.calibration import use_shared_statistics
from slim_det.config import scaled_lr_steps
from slim_det.engine import SlimTrainer
from tests.engine_helpers import shapes_cfg

# The test model is smaller than the demo's (configs/tests/tiny.yaml) and sees 96 px images, so
# that it trains in a few minutes; the solver recipe (optimizer, batch, learning rate, warm-up,
# schedule, loss reduction, clipping) is the one configs/shapes ships, restored over tiny.yaml's.
SHIPPED_SOLVER_KEYS = ("OPTIMIZER", "BASE_LR", "WEIGHT_DECAY", "LR_SCHEDULER_NAME", "WARMUP_ITERS",
                       "CLIP_GRADIENTS", "IMS_PER_BATCH", "MAX_ITER", "STEPS")
# Shorter than the shipped 306 steps (the lr step at the same fraction) to keep the suite well
# under 20 minutes; the thresholds below hold with a wide margin at this length (see the test).
MASK_TEST_ITERS = 200
UNIVERSAL_TEST_ITERS = 180
LEARNING_OPTS = {
    "TEST.EVAL_PERIOD": 0,
    "INPUT.MIN_SIZE_TRAIN": (96,),
    "INPUT.MAX_SIZE_TRAIN": 96,
    "INPUT.MIN_SIZE_TEST": 96,
    "INPUT.MAX_SIZE_TEST": 96,
}


def _learning_cfg(tmp_path, seed, task="mask"):
    shipped = shapes_cfg(task, tiny=False)
    cfg = shapes_cfg(task, tmp_path, tiny_data=False, **LEARNING_OPTS)
    for key in SHIPPED_SOLVER_KEYS:
        cfg.SOLVER[key] = shipped.SOLVER[key]
    cfg.MODEL.SLIM.LOSS_REDUCTION = shipped.MODEL.SLIM.LOSS_REDUCTION
    cfg.SEED = seed
    return cfg


def test_mask_rcnn_learns_at_every_width(tmp_path):
    seed = int(os.environ.get("SLIM_DET_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"learning test seed: {seed} (replay with SLIM_DET_TEST_SEED={seed})")
    cfg = _learning_cfg(tmp_path, seed)
    cfg.SOLVER.STEPS = scaled_lr_steps(cfg, MASK_TEST_ITERS)
    cfg.SOLVER.MAX_ITER = MASK_TEST_ITERS
    seed_all_rng(seed)
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before = SlimTrainer.test(cfg, trainer.model)
    trainer.train()
    after = trainer._last_eval_results
    summary = {w: (before[w]["bbox"]["AP50"], after[w]["bbox"]["AP50"], after[w]["segm"]["AP50"])
               for w in after}
    print(f"seed {seed}: (untrained box AP50, box AP50, mask AP50) per width: {summary}")
    # Learned vs. not: an untrained model scores about 0 and a collapsed run (issue 8) about 3 at
    # every width. At 200 steps, 3 drawn seeds: box AP50 52.1-62.9 at width 1 and 41.2-45.7 at
    # 0.25 (8 FPN channels), mask AP50 40.5 or more at every width (0-1.0 untrained).
    for width in ("w1", "w0.75", "w0.5", "w0.25"):
        untrained = torch.nan_to_num(torch.tensor(before[width]["bbox"]["AP50"])).item()
        assert after[width]["bbox"]["AP50"] >= untrained + 15, (seed, width, summary)
        assert after[width]["segm"]["AP50"] >= 10, (seed, width, summary)
    assert after["w1"]["bbox"]["AP50"] >= 30, (seed, summary)


def test_universal_calibrated_widths_never_drawn_learn(tmp_path):
    """US-Nets on the shapes: widths the sandwich rule never drew exactly, once calibrated, are
    clearly above the untrained model, and clearly above the same width without calibration (the
    shared norms' running statistics, mixed over every drawn width) where those mixed statistics
    are far from the width's own (0.85)."""
    seed = int(os.environ.get("SLIM_DET_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"universal learning test seed: {seed} (replay with SLIM_DET_TEST_SEED={seed})")
    widths = [0.85, 0.6, 0.4]
    cfg = _learning_cfg(tmp_path, seed, task="universal_mask")
    cfg.MODEL.SLIM.WIDTHS = widths
    cfg.TEST.CALIBRATION_IMAGES = 100
    # Shorter than the shipped schedule (the lr step at the same fraction) to keep the suite
    # well under 20 minutes. At 180 steps, on 4 drawn seeds (before MODEL.SLIM.FPN_MIN_WIDTH),
    # calibrated box AP50 at 0.85 / 0.6 / 0.4 was 46.4-54.9 / 41.2-50.5 / 33.2-37.1, against
    # 0-1.2 untrained and 0-3.0 uncalibrated at 0.85: far above both thresholds below.
    cfg.SOLVER.STEPS = scaled_lr_steps(cfg, UNIVERSAL_TEST_ITERS)
    cfg.SOLVER.MAX_ITER = UNIVERSAL_TEST_ITERS
    seed_all_rng(seed)
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)
    untrained = SlimTrainer.test(cfg, trainer.model)  # calibrated too: an untrained model's best
    trainer.train()
    calibrated = trainer._last_eval_results
    drawn = {w for i in range(cfg.SOLVER.MAX_ITER) for _, w in
             trainer._trainer.schedule.widths_for(i)}
    assert not drawn & set(widths)
    use_shared_statistics(trainer.model, widths)
    uncalibrated = SlimTrainer.test(cfg, trainer.model)
    summary = {w: tuple(round(r[w]["bbox"]["AP50"], 1) for r in (untrained, uncalibrated,
                                                                   calibrated))
               for w in calibrated}
    print(f"seed {seed}: (untrained, uncalibrated, calibrated) box AP50 per width: {summary}")
    for width in ("w0.85", "w0.6", "w0.4"):
        before = torch.nan_to_num(torch.tensor(untrained[width]["bbox"]["AP50"])).item()
        assert calibrated[width]["bbox"]["AP50"] >= before + 15, (seed, width, summary)
    # The shared running average is updated last by the min width every iteration, so it roughly
    # fits narrow widths and not wide ones. Three seeds of the former SGD recipe, uncalibrated ->
    # calibrated: 0.85: (almost) nothing detected -> 36.9 / 44.0 / 39.4; 0.6: 2.2 -> 32.4,
    # 38.9 -> 44.3, 34.8 -> 30.1; 0.4: 26.8 -> 27.1, 31.7 -> 36.1, 31.9 -> 33.7. At 0.6 and 0.4
    # either can win, so only 0.85 is compared (the calibrated statistics themselves are checked
    # exactly in test_calibration.py).
    without = torch.nan_to_num(torch.tensor(uncalibrated["w0.85"]["bbox"]["AP50"])).item()
    assert calibrated["w0.85"]["bbox"]["AP50"] >= without + 10, (seed, "w0.85", summary)
