#!/usr/bin/env python
"""Export one width of a slimmable detector as a plain detectron2 model.

    python tools/export_width.py --config-file configs/slim_mask_rcnn_all.yaml --width 0.5 \
        --output export/w0.5 [--format torchscript|onnx] MODEL.WEIGHTS output/model_final.pth
    python tools/export_width.py --config-file X --channels output/autoslim/gflops_1.5.json \
        --output export/searched MODEL.WEIGHTS supernet.pth

Writes ``config.yaml`` and ``model_final.pth`` (tensors of that width only) into ``--output``.
Any width with batch-norm statistics exports: a trained width, or any other width (any width in
WIDTH_RANGE for a universally slimmable model) once calibrated; a width without statistics is
calibrated first on TEST.CALIBRATION_IMAGES training images (0: refused with an error).
ResNet-50/101 exports use stock detectron2 config keys and load without slim_det (R-CNN, Cascade,
RetinaNet, and Panoptic FPN with scope "backbone"); others name slim_det's fixed-channel backbone
or semantic head (load them with ``slim_det.export.load_exported``): see docs/deploy.md.
``--channels`` exports a channel configuration (tools/autoslim.py) instead: the plain model has
exactly its per-group channels; its config names the configuration (copied into ``--output`` as
``channels.json``) in MODEL.SLIM.INDIVIDUAL_CHANNELS, so ``tools/train_net.py`` evaluates,
fine-tunes or retrains it from scratch. With ``--format`` the plain model is also traced (``model.ts`` or ``model.onnx``) on one image and
checked against the eager model.

A checkpoint that leaves any model tensor unloaded is refused (slim_det/weights.py; opt out with
MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS True), as are a ``--sample-image`` that is not an image and an
``--output`` that cannot be written: one message, exit status 2.
"""
import argparse
import json
import logging
import os

import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import slim_det  # noqa: F401  (registers slim_det's backbones, heads and datasets)
from slim_det.calibration import calibrate_from_config, widths_without_statistics
from slim_det.config import check_runnable_width, load_slim_cfg
from slim_det.channels import load_channels, save_channels, set_channels
from slim_det.export import (
    export_channels,
    export_onnx,
    export_torchscript,
    export_width,
    max_output_difference,
    save_exported,
    verify_export,
)
from slim_det.inputs import check_writable_dir, exit_on_input_error, read_image_file
from slim_det.weights import load_weights

FORMAT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the slim model's config")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--width", type=float, help="a trained width, or any width "
                       "inside MODEL.SLIM.WIDTH_RANGE of a universal model (calibrated first)")
    which.add_argument("--channels", help="a channel configuration JSON (tools/autoslim.py's "
                       "gflops_*.json) to export instead of a uniform width (calibrated first)")
    parser.add_argument("--output", required=True, help="directory to write the export into")
    parser.add_argument("--format", choices=sorted(FORMAT_FILES), help="also write a traced model")
    parser.add_argument(
        "--sample-image",
        help="image to check the export on and to trace with (default: a random image of "
        "INPUT.MIN_SIZE_TEST pixels square)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser.parse_args(argv)


def setup(args):
    cfg = load_slim_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def sample_image(cfg, path):
    """One (C, H, W) float image as the model gets it after test-time resizing."""
    if path is None:
        side = cfg.INPUT.MIN_SIZE_TEST
        return torch.randint(0, 256, (3, side, side), dtype=torch.uint8).float()
    image = read_image_file(path, cfg.INPUT.FORMAT, "--sample-image")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def main(args):
    with exit_on_input_error("export_width.py"):
        return _run(args)


def _run(args):
    setup_logger(name="slim_det")
    logger = logging.getLogger("slim_det")
    cfg = setup(args)
    if args.channels is None:
        args.width = check_runnable_width(cfg, args.width)
    else:
        config = load_channels(args.channels)  # a bad file is named before any work
    check_writable_dir(args.output, "--output")
    if args.sample_image is not None:
        read_image_file(args.sample_image, cfg.INPUT.FORMAT, "--sample-image")  # before any work
    model = build_model(cfg)
    load_weights(cfg, model)  # refuses a checkpoint that leaves model tensors unloaded
    model.eval()
    if args.channels is not None:
        return _export_channels(args, cfg, model, config)
    if widths_without_statistics(model, [args.width]) and cfg.TEST.CALIBRATION_IMAGES > 0:
        calibrate_from_config(cfg, model, [args.width], cfg.TEST.CALIBRATION_IMAGES,
                              "TEST.CALIBRATION_IMAGES")

    plain_cfg, plain, kind = export_width(model, cfg, args.width)
    image = sample_image(cfg, args.sample_image).to(plain.device)
    differences = verify_export(model, plain, args.width, [{"image": image}])
    if differences["features"] > 1e-3:
        raise RuntimeError(f"The exported model differs from the slim model: {differences}")
    config_path, weights_path = save_exported(plain_cfg, plain, args.output)
    summary = {
        "width": args.width,
        "kind": kind,
        "config": config_path,
        "weights": weights_path,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "max_difference_vs_slim": differences,
    }
    if args.format:
        path = os.path.join(args.output, FORMAT_FILES[args.format])
        export = export_torchscript if args.format == "torchscript" else export_onnx
        summary[args.format] = {"path": path, "max_difference_vs_eager": export(plain, image, path)}
    logger.info("Export done.")
    print(json.dumps(summary, indent=2))
    return summary


def _export_channels(args, cfg, model, config):
    logger = logging.getLogger("slim_det")
    config = set_channels(model, config)  # unknown or missing groups are named here
    if cfg.TEST.CALIBRATION_IMAGES > 0:
        calibrate_from_config(cfg, model, [config], cfg.TEST.CALIBRATION_IMAGES,
                              "TEST.CALIBRATION_IMAGES")
    os.makedirs(args.output, exist_ok=True)
    channels_file = os.path.join(args.output, "channels.json")
    save_channels(config, channels_file)
    plain_cfg, plain = export_channels(model, cfg, config, channels_file)
    image = sample_image(cfg, args.sample_image).to(plain.device)
    model.eval()
    plain.eval()
    with torch.no_grad():
        difference = max_output_difference(model([{"image": image}]), plain([{"image": image}]))
    config_path, weights_path = save_exported(plain_cfg, plain, args.output)
    summary = {
        "channels": channels_file,
        "config": config_path,
        "weights": weights_path,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "max_difference_vs_slim": {"outputs": difference},
    }
    logger.info("Export done.")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_args())
