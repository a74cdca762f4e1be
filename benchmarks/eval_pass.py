#!/usr/bin/env python
"""Evaluating every width in one pass over the data vs. one pass per width.

    python benchmarks/eval_pass.py [--images 16] [--size 512]

One pass is `slim_det.engine.evaluation.inference_all_widths`: each batch is loaded and decoded
once and run at every width. The alternative is detectron2's `inference_on_dataset` once per
width. Both use a COCOEvaluator per width on the generated "shapes" images (upscaled to
``--size``), so the difference is the data loading that one pass shares.
"""
import contextlib
import io
import logging
import statistics
import tempfile
import uuid

import _common
import torch
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

import slim_det
from slim_det.data import ensure_shapes, register_shapes
from slim_det.engine.evaluation import inference_all_widths


def shapes_dataset(root, images):
    """Generate ``images`` shapes images under ``root``; return the registered dataset name."""
    splits = {"val": (images, 1)}
    ensure_shapes(root, splits)
    prefix = "bench_shapes_" + uuid.uuid4().hex[:8]
    register_shapes(root, prefix=prefix, splits=splits)
    return f"{prefix}_val"


def warm_up(model, loader, widths, runs):
    inputs = next(iter(loader))
    with torch.no_grad():
        for _ in range(runs):
            for width in widths:
                with slim_det.using_width(model, width):
                    model(inputs)


def evaluators(dataset, widths):
    return {w: COCOEvaluator(dataset, distributed=False) for w in widths}


def time_one_pass(model, loader, dataset, widths):
    start = _common.now()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary
        inference_all_widths(model, loader, evaluators(dataset, widths))
    return _common.now() - start


def time_pass_per_width(model, loader, dataset, widths):
    start = _common.now()
    with contextlib.redirect_stdout(io.StringIO()):
        for width, evaluator in evaluators(dataset, widths).items():
            with slim_det.using_width(model, width):
                inference_on_dataset(model, loader, evaluator)
    return _common.now() - start


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], warmup=1, repeats=1)
    p.add_argument("--images", type=int, default=16, help="images in the evaluated set")
    args = _common.parse(p, argv)
    if args.tiny:
        args.images = 2
    # COCOEvaluator reports its per-category tables through logging; keep the output short.
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    widths = sorted(args.widths, reverse=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        dataset = shapes_dataset(root, args.images)
        for scope in args.scopes:
            args.opts = list(args.opts) + [
                "MODEL.ROI_HEADS.NUM_CLASSES", 3, "INPUT.MIN_SIZE_TEST", args.size,
                "INPUT.MAX_SIZE_TEST", args.size, "DATALOADER.NUM_WORKERS", 0,
            ]
            cfg, model = _common.build_slim_model(args, scope)
            loader = build_detection_test_loader(cfg, dataset)

            warm_up(model, loader, widths, args.warmup)
            one_pass, per_width = [], []
            for _ in range(args.repeats):
                one_pass.append(time_one_pass(model, loader, dataset, widths))
                per_width.append(time_pass_per_width(model, loader, dataset, widths))
            one_pass, per_width = statistics.median(one_pass), statistics.median(per_width)
            rows.append({
                "scope": scope,
                "widths": widths,
                "images": args.images,
                "one_pass_s": one_pass,
                "pass_per_width_s": per_width,
                "ratio": one_pass / per_width,
            })
    table = _common.format_table(rows, [
        ("scope", "scope", "{}"), ("images", "images", "{}"),
        ("one_pass_s", "one pass s", "{:.1f}"), ("pass_per_width_s", "pass per width s", "{:.1f}"),
        ("ratio", "ratio", "{:.3f}"),
    ])
    result = {"benchmark": "eval_pass", "environment": _common.environment(args), "rows": rows}
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
