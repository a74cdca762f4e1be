#!/usr/bin/env python
"""Calibrate a slim model's batch-norm statistics at some widths and save the checkpoint.

    python tools/calibrate.py --config-file configs/slim_mask_rcnn_universal.yaml \\
        --widths 0.4 0.6 --output output/model_cal.pth MODEL.WEIGHTS output/model_final.pth

Each width's statistics become the exact mean / variance of every batch norm's input over
``--images`` training images (default TEST.CALIBRATION_IMAGES) with test-time transforms; widths
without statistics of their own get calibrated private norms. The saved checkpoint evaluates
(tools/train_net.py --eval-only) and exports at those widths without calibrating again.
Runs in one process (MODEL.DEVICE). A checkpoint that leaves any model tensor unloaded is refused
(slim_det/weights.py; opt out with MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS True), as is an ``--output``
that cannot be written, before any calibration: one message, exit status 2.
"""
import argparse
import os

import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import slim_det  # noqa: F401  (registers slim_det's backbones, heads and datasets)
from slim_det.calibration import calibrate_from_config, report_loaded_norms
from slim_det.config import is_universal, load_slim_cfg, width_range
from slim_det.inputs import InputError, check_writable_file, exit_on_input_error
from slim_det.weights import load_weights
from slim_det.width import check_width


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's slim_det config")
    parser.add_argument("--widths", nargs="+", required=True,
                        help="widths to calibrate, in (0, 1] (universal: inside WIDTH_RANGE)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images to use (default: TEST.CALIBRATION_IMAGES)")
    parser.add_argument("--output", required=True, help="path of the calibrated checkpoint (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    # "--widths 0.4 0.6 MODEL.WEIGHTS m.pth": the widths end where the KEY VALUE opts begin.
    numbers = []
    for value in args.widths:
        try:
            numbers.append(float(value))
        except ValueError:
            break
    if not numbers:
        parser.error(f"--widths needs at least one number; got {args.widths}.")
    args.opts = args.widths[len(numbers):] + args.opts
    args.widths = numbers
    return args


def main(argv=None):
    args = parse_args(argv)
    with exit_on_input_error("calibrate.py"):
        return _run(args)


def _run(args):
    setup_logger(name="slim_det")
    setup_logger()
    cfg = load_slim_cfg(args.config_file, args.opts)
    widths = [check_width(w) for w in args.widths]
    if is_universal(cfg):
        low, high = width_range(cfg)
        outside = [w for w in widths if not low <= w <= high]
        if outside:
            raise SystemExit(f"--widths {outside} lie outside MODEL.SLIM.WIDTH_RANGE "
                             f"[{low:g}, {high:g}], the widths this model was trained for.")
    images = cfg.TEST.CALIBRATION_IMAGES if args.images is None else args.images
    if images < 1:
        raise SystemExit(f"--images (or TEST.CALIBRATION_IMAGES) must be >= 1; got {images}.")
    check_writable_file(args.output, "--output")
    model = build_model(cfg)
    load_weights(cfg, model)  # refuses a checkpoint that leaves model tensors unloaded
    report_loaded_norms(model)
    calibrate_from_config(cfg, model, widths, images, "--images")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        torch.save({"model": model.state_dict()}, args.output)
    except OSError as error:
        raise InputError(f"--output {args.output!r} could not be written ({error.strerror}); give "
                         "a path in a writable folder.") from None
    print(f"Saved the model calibrated at widths {widths} to {args.output}")


if __name__ == "__main__":
    main()
