#!/usr/bin/env python
"""Batch-norm calibration cost: seconds and images needed before AP stops improving.

    python benchmarks/calibration_cost.py --config-file X [--images 100 300 1000 2000]
        [--widths 0.85 0.6 0.4] [--tolerance 0.5] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

For each image count it calibrates the model's batch-norm statistics at ``--widths`` from scratch
on that many training images (`slim_det.calibrate_norms`, the images `build_calibration_loader`
picks: a fixed sample of DATASETS.TRAIN with test-time transforms), times it, and evaluates the
model at those widths on DATASETS.TEST. A universally slimmable model is also evaluated at 0
images: the shared norms' running statistics from training (`use_shared_statistics`), i.e.
without calibration. Counts above the training set's size are skipped and say so. It prints and
writes (``--output-dir``/calibration_cost.{json,md}``) per count: seconds, seconds per image and
width, box AP (AP50, mask AP) per width and their mean; and the smallest count whose mean box AP
is within ``--tolerance`` of the largest count's ("enough").
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _common  # noqa: E402
import fidelity  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import get_detection_dataset_dicts  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from slim_det.calibration import (  # noqa: E402
    build_calibration_loader,
    calibrate_norms,
    switchable_norms,
    use_shared_statistics,
)
from slim_det.config import check_runnable_width, is_universal, load_slim_cfg  # noqa: E402
from slim_det.engine import SlimTrainer  # noqa: E402
from slim_det.width import width_key  # noqa: E402

METRICS = (("box_ap", "bbox", "AP"), ("box_ap50", "bbox", "AP50"), ("mask_ap", "segm", "AP"),
           ("keypoint_ap", "keypoints", "AP"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=fidelity.DEFAULT_CONFIG)
    p.add_argument("--images", type=int, nargs="+", help="calibration image counts (default: "
                   "100 300 1000 2000; --tiny: 2 4)")
    p.add_argument("--widths", type=float, nargs="+", help="default: the config's MODEL.SLIM."
                   "TEST_WIDTHS or WIDTHS")
    p.add_argument("--tolerance", type=float, default=0.5, help="box AP within which a count "
                   "counts as enough (default 0.5)")
    p.add_argument("--output-dir", default="output/calibration_cost")
    p.add_argument("--tiny", action="store_true", help="a tiny random universal model on the "
                   "tiny data, 2 and 4 images, width 0.75 (tests)")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        p.error(f"config options must be KEY VALUE pairs; got {args.opts}")
    if args.tiny:
        args.images = args.images or [2, 4]
        args.widths = args.widths or [0.75]
        args.opts = fidelity._tiny_opts() + [
            "MODEL.SLIM.MODE", "universal", "MODEL.SLIM.WIDTH_RANGE", "[0.5, 1.0]",
            "MODEL.SLIM.WIDTHS", "[0.5, 1.0]", "MODEL.DEVICE", "cpu"] + list(args.opts)
    args.images = sorted(set(args.images or [100, 300, 1000, 2000]))
    bad = [n for n in args.images if n < 1]
    if bad:
        p.error(f"--images must be positive counts; got {bad}")
    return args


def _evaluate(cfg, model, widths):
    results = SlimTrainer.test(cfg, model)
    rows = {}
    for width in widths:
        metrics = results[f"w{width_key(width)}"]
        rows[width] = {key: metrics[task][name] for key, task, name in METRICS
                       if task in metrics}
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def measure(cfg, model, widths, images):
    """One row per image count (0: the shared statistics), see the module docstring."""
    available = len(get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False))
    rows = []
    if is_universal(cfg):
        use_shared_statistics(model, widths)
        rows.append({"images": 0, "seconds": 0.0, "note": "shared running statistics",
                     "per_width": _evaluate(cfg, model, widths)})
    for count in images:
        if count > available:
            rows.append({"images": count, "skipped": f"{cfg.DATASETS.TRAIN} has {available} "
                         "images"})
            continue
        loader, per_process = build_calibration_loader(cfg, count)
        start = time.perf_counter()
        calibrate_norms(model, loader, widths, per_process)
        seconds = time.perf_counter() - start
        rows.append({"images": count, "seconds": seconds,
                     "s_per_image_and_width": seconds / (count * len(widths)),
                     "per_width": _evaluate(cfg, model, widths)})
    for row in rows:
        if "per_width" in row:
            row["mean_box_ap"] = _mean(r.get("box_ap") for r in row["per_width"].values())
    return rows


def enough(rows, tolerance):
    """The smallest calibrated count whose mean box AP is within ``tolerance`` of the largest's."""
    measured = [r for r in rows if r.get("mean_box_ap") is not None and r["images"] > 0]
    if not measured:
        return None
    best = measured[-1]["mean_box_ap"]
    return next(r["images"] for r in measured if r["mean_box_ap"] >= best - tolerance)


def markdown(rows, widths):
    keys = [k for k, _, _ in METRICS if any(k in r.get("per_width", {}).get(w, {})
                                            for r in rows for w in widths)]
    header = ["images", "seconds", "s / (image · width)"] + [
        f"{k.replace('_', ' ')} @{w:g}" for w in widths for k in keys] + ["mean box AP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['images']} | skipped: {r['skipped']} |")
            continue
        cells = [f"{r['images']}" + (f" ({r['note']})" if r.get("note") else ""),
                 f"{r['seconds']:.1f}",
                 f"{r['s_per_image_and_width']:.3f}" if "s_per_image_and_width" in r else "-"]
        cells += [f"{r['per_width'][w].get(k, float('nan')):.1f}" for w in widths for k in keys]
        cells.append("-" if r["mean_box_ap"] is None else f"{r['mean_box_ap']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts + ["OUTPUT_DIR", args.output_dir])
    widths = sorted({check_runnable_width(cfg, w) for w in
                     (args.widths or cfg.MODEL.SLIM.TEST_WIDTHS or cfg.MODEL.SLIM.WIDTHS)},
                    reverse=True)
    cfg.MODEL.SLIM.TEST_WIDTHS = widths
    cfg.freeze()
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    elif not args.tiny:
        raise SystemExit("Set MODEL.WEIGHTS to the trained model to calibrate.")
    if not switchable_norms(model):
        raise SystemExit("The model has no switchable batch norm: nothing to calibrate.")
    rows = measure(cfg, model, widths, args.images)
    chosen = enough(rows, args.tolerance)
    md = (f"Calibration at widths {widths} of {cfg.MODEL.WEIGHTS or 'a random model'} "
          f"({args.config_file}); evaluated on {list(cfg.DATASETS.TEST)}.\n\n"
          + markdown(rows, widths)
          + f"\n\nEnough (mean box AP within {args.tolerance:g} of the largest count's): "
          + (f"{chosen} images" if chosen else "-") + "\n")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "calibration_cost.md"), "w") as f:
        f.write(md)
    result = {
        "benchmark": "calibration_cost",
        "environment": {"device": cfg.MODEL.DEVICE, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "tiny": args.tiny,
                        "load_average_1m": os.getloadavg()[0]},
        "config": args.config_file, "weights": cfg.MODEL.WEIGHTS, "widths": widths,
        "tolerance": args.tolerance, "enough_images": chosen,
        "rows": [dict(r, per_width={f"{w:g}": v for w, v in r.get("per_width", {}).items()})
                 for r in rows],
    }
    with open(os.path.join(args.output_dir, "calibration_cost.json"), "w") as f:
        json.dump(result, f, indent=2)
    _common.emit(result, md, args.json_out)
    return result


if __name__ == "__main__":
    main()
