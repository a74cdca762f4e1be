#!/usr/bin/env python
"""Run a slimmable detector on one image at the widest width that meets a latency budget.

    python tools/demo.py --config-file configs/slim_mask_rcnn_all.yaml --input photo.jpg \
        --latency-budget-ms 400 --output out.png MODEL.WEIGHTS output/model_final.pth

Each trained width (MODEL.SLIM.TEST_WIDTHS, or all of MODEL.SLIM.WIDTHS) is timed on this image
on this device; the widest one within the budget runs, and its detections are drawn with
detectron2's Visualizer. ``--width`` skips the timing and uses that width.

A checkpoint that leaves any model tensor unloaded is refused (slim_det/weights.py; opt out with
MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS True), as are an ``--input`` that is not an image and an
``--output`` that cannot be written as an image: one message, exit status 2.
"""
import argparse
import json
import logging
import os

import cv2
import torch
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import slim_det
from slim_det.config import load_slim_cfg
from slim_det.config import test_widths
from slim_det.deploy import NoWidthFitsError, WidthSelector
from slim_det.inputs import (
    IMAGE_SUFFIXES,
    InputError,
    check_writable_file,
    exit_on_input_error,
    read_image_file,
)
from slim_det.weights import slim_predictor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="where to write the drawn detections")
    parser.add_argument("--latency-budget-ms", type=float, help="pick the widest width within it")
    parser.add_argument("--width", type=float, help="run this width instead of choosing one")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per width")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per width (median)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    if (args.width is None) == (args.latency_budget_ms is None):
        parser.error("give exactly one of --latency-budget-ms and --width")
    return args


def setup(args):
    cfg = load_slim_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def model_inputs(predictor, image):
    """The input DefaultPredictor would give its model, so timing sees the real image size."""
    if predictor.input_format == "RGB":
        image = image[:, :, ::-1]
    height, width = image.shape[:2]
    resized = predictor.aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    return [{"image": tensor, "height": height, "width": width}]


def main(args):
    with exit_on_input_error("demo.py"):
        return _run(args)


def _run(args):
    setup_logger(name="slim_det")
    cfg = setup(args)
    image = read_image_file(args.input, "BGR")  # DefaultPredictor's input convention
    check_writable_file(args.output, "--output", IMAGE_SUFFIXES)
    predictor = slim_predictor(cfg)  # refuses a checkpoint that leaves model tensors unloaded

    summary = {"device": str(predictor.model.device)}
    width = args.width
    if width is None:
        selector = WidthSelector(
            predictor.model,
            widths=test_widths(cfg),
            inputs=model_inputs(predictor, image),
            warmup=args.warmup,
            repeats=args.repeats,
        )
        summary["latency_ms"] = selector.measure()
        summary["budget_ms"] = args.latency_budget_ms
        try:
            width = selector.select(args.latency_budget_ms)
        except NoWidthFitsError as error:
            print(json.dumps(summary, indent=2))
            raise SystemExit(f"error: {error}") from None
    slim_det.set_width(predictor.model, width)
    summary["width"] = width
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= args.confidence_threshold]
    summary["detections"] = len(instances)

    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
    visualizer = Visualizer(image[:, :, ::-1], MetadataCatalog.get(dataset))
    drawn = visualizer.draw_instance_predictions(instances).get_image()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if not cv2.imwrite(args.output, drawn[:, :, ::-1]):
        raise InputError(f"--output {args.output!r} could not be written as an image; give a "
                         f"path in a writable folder ending in one of {', '.join(IMAGE_SUFFIXES)}.")
    summary["output"] = args.output
    logging.getLogger("slim_det").info(f"Ran width {width:g}; wrote {args.output}.")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_args())
