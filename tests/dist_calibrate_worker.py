"""Calibrates the tiny Faster R-CNN with N processes (gloo on CPU); saves each rank's weights.

Run as ``python -m tests.dist_calibrate_worker --num-procs 2 --output DIR`` from the repository
root. SOLVER.IMS_PER_BATCH is N, so every process calibrates on batches of one image, as one
process does with N = 1: the union of the images and each image's computation are the same.
"""
import argparse
import os

import torch
from detectron2.engine import launch
from detectron2.utils import comm

from slim_det.calibration import build_calibration_loader, calibrate_norms
from slim_det.engine import SlimTrainer
from tests.engine_helpers import shapes_cfg, state_of


def calibrate_and_save(output_dir, num_procs):
    cfg = shapes_cfg("faster", output_dir, **{"SOLVER.IMS_PER_BATCH": num_procs})
    torch.manual_seed(0)  # the same initial weights in every process and run
    model = SlimTrainer.build_model(cfg)
    loader, per_process = build_calibration_loader(cfg, 8)
    calibrate_norms(model, loader, [1.0, 0.6], per_process)
    torch.save(state_of(model), os.path.join(output_dir, f"rank{comm.get_rank()}.pth"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-procs", type=int, default=2)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    launch(calibrate_and_save, args.num_procs, dist_url="auto", args=(args.output, args.num_procs))
