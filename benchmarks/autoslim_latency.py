#!/usr/bin/env python
"""Searching on latency vs on GFLOPs: which cost model predicts latency, and which search wins.

    python benchmarks/autoslim_latency.py \\
        --config-file configs/shapes/slim_universal_mask_rcnn_shapes.yaml \\
        --supernet output/supernet/model_final.pth \\
        --latency-search output/autoslim_ms --gflops-search output/autoslim \\
        [--random 16] [--output-dir output/autoslim_latency] [KEY VALUE ...]

Run it alone on the machine: it times. Two parts.

1. **Cost models.** For uniform widths (``--uniform-step`` apart over the trained range) and ``--random``
   random configurations spread over the cost range: GFLOPs (`ConvCost`), the latency predicted by
   the search's per-layer table (``latency_table.json`` of ``--latency-search``, `LatencyCost`),
   the measured latency of the same fixed-count forward the table times, and the end-to-end
   latency of the calibrated supernet at that configuration on real images (median per image
   over ``--images`` images of DATASETS.TEST[0], batch 1). Spearman rank correlation of GFLOPs
   and of the table with each measured latency, and the table's mean absolute error.
2. **Searches at the same latency budget.** For every ``ms_<T>.json`` of the latency search: that
   configuration; the last configuration on the GFLOPs search's path whose *predicted* latency
   is at most T (what a GFLOPs search gives for that budget); and the widest uniform width at most
   T. Each is measured as above and evaluated inside the supernet (calibrated on
   TEST.CALIBRATION_IMAGES training images, on DATASETS.TEST[0]: box AP, mask AP).

Prints JSON lines and a table; writes ``autoslim_latency.{json,md}`` to ``--output-dir``.
"""
import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import slim_det  # noqa: E402,F401
from slim_det.autoslim import (  # noqa: E402
    ConvCost,
    LatencyCost,
    fixed_forward_ms,
    forget_configuration,
)
from slim_det.calibration import build_calibration_loader, calibrate_norms  # noqa: E402
from slim_det.channels import (  # noqa: E402
    ChannelConfig,
    channel_groups,
    load_channels,
    set_channels,
    uniform_channels,
)
from slim_det.config import load_slim_cfg  # noqa: E402
from slim_det.width import set_width  # noqa: E402
from slim_det.weights import load_weights  # noqa: E402

# benchmarks/autoslim.py under its own name ("autoslim" is tools/autoslim.py where both are on
# the path).
_spec = importlib.util.spec_from_file_location(
    "autoslim_benchmark", os.path.join(REPO, "benchmarks", "autoslim.py"))
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
evaluate_in_supernet, random_config, spearman = (
    _bench.evaluate_in_supernet, _bench.random_config, _bench.spearman)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="the supernet's config")
    p.add_argument("--supernet", required=True, help="the supernet's checkpoint")
    p.add_argument("--latency-search", required=True,
                   help="tools/autoslim.py --target-latency-ms output folder")
    p.add_argument("--gflops-search", required=True,
                   help="tools/autoslim.py --target-gflops output folder (same supernet)")
    p.add_argument("--random", type=int, default=16, help="random configurations (part 1)")
    p.add_argument("--uniform-step", type=float, default=0.125,
                   help="spacing of the uniform widths of part 1, from 1.0 down to the range's min")
    p.add_argument("--images", type=int, default=16, help="test images per end-to-end timing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the fixed forward")
    p.add_argument("--output-dir", default="output/autoslim_latency")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p.parse_args(argv)


@torch.no_grad()
def end_to_end_ms(model, config, calibration, images):
    """Median per-image ms of the supernet at ``config`` on real images (batch 1), its batch
    norms calibrated on a few training images first (statistics change what it detects, and so
    the mask head's work, not the cost of a layer)."""
    config = set_channels(model, config)
    calibrate_norms(model, calibration, [config], 8)
    model(images[0])  # warm-up
    times = []
    for batch in images:
        start = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - start) * 1000)
    forget_configuration(model, config)
    set_width(model, 1.0)
    return statistics.median(times)


def mean_abs_error(predicted, measured):
    return statistics.mean(abs(p - m) / m for p, m in zip(predicted, measured))


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", args.supernet])
    os.makedirs(args.output_dir, exist_ok=True)
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    groups = channel_groups(model)
    size = cfg.INPUT.MAX_SIZE_TEST
    counts = ((size, size), cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)
    gflops = ConvCost(model, *counts)
    with open(os.path.join(args.latency_search, "latency_table.json")) as f:
        table = LatencyCost(model, *counts, table=json.load(f))
    dataset = cfg.DATASETS.TEST[0]
    calibration, _ = build_calibration_loader(cfg, cfg.TEST.CALIBRATION_IMAGES)
    calibration = [list(b) for b in calibration]
    loader = build_detection_test_loader(cfg, dataset)
    images = [batch for _, batch in zip(range(args.images), loader)]
    low = cfg.MODEL.SLIM.WIDTH_RANGE[0] if cfg.MODEL.SLIM.MODE == "universal" else 0.25

    def measure(kind, config):
        config = ChannelConfig(config)
        row = {"kind": kind, "gflops": gflops(config), "table_ms": table(config),
               "fixed_ms": fixed_forward_ms(model, counts, [config], 1, args.repeats)[0],
               "e2e_ms": end_to_end_ms(model, config, calibration, images),
               "channels": dict(config)}
        print(json.dumps({k: v for k, v in row.items() if k != "channels"}), flush=True)
        return row

    # Part 1: do GFLOPs and the table rank configurations by measured latency?
    points = []
    for k in range(int((1 - low) / args.uniform_step + 1e-9) + 1):
        width = round(1.0 - k * args.uniform_step, 6)
        points.append(measure(f"uniform_{width:g}", uniform_channels(model, width)))
    rng = random.Random(0)
    smallest = gflops({g.name: g.allowed[0] for g in groups})
    largest = gflops({g.name: g.full for g in groups})
    for k in range(args.random):
        config = None
        while config is None:
            config = random_config(groups, gflops, rng.uniform(1.2 * smallest, 0.95 * largest),
                                   rng, tolerance=0.05)
        points.append(measure(f"random_{k}", config))
    models = {}
    for measured in ("fixed_ms", "e2e_ms"):
        truth = [p[measured] for p in points]
        models[measured] = {
            "spearman_gflops": spearman([p["gflops"] for p in points], truth),
            "spearman_table": spearman([p["table_ms"] for p in points], truth),
            "table_mean_abs_error": mean_abs_error([p["table_ms"] for p in points], truth)}

    # Part 2: the latency search against the GFLOPs search and uniform width, per budget.
    with open(os.path.join(args.gflops_search, "search.json")) as f:
        path = json.load(f)["path"]
    heads = []
    targets = sorted((float(n[3:-5]) for n in os.listdir(args.latency_search)
                      if n.startswith("ms_") and n.endswith(".json")), reverse=True)
    grid = [round(1.0 - 0.005 * i, 3) for i in range(int((1 - low) / 0.005) + 1)]
    for target in targets:
        chosen = {"latency search": load_channels(
            os.path.join(args.latency_search, f"ms_{target:g}.json"))}
        within = [p for p in path if table(p["channels"]) <= target]
        if within:
            chosen["GFLOPs search"] = within[0]["channels"]
        width = next((w for w in grid if table(uniform_channels(model, w)) <= target), None)
        if width is not None:
            chosen[f"uniform {width:g}"] = uniform_channels(model, width)
        for kind, config in chosen.items():
            row = measure(kind, config)
            row["target_ms"] = target
            row["supernet"] = evaluate_in_supernet(cfg, model, config, calibration, dataset)
            set_width(model, 1.0)
            print(json.dumps({"target_ms": target, "kind": kind, **row["supernet"]}), flush=True)
            heads.append(row)

    result = {"config_file": args.config_file, "supernet": args.supernet,
              "threads": torch.get_num_threads(), "image_size": size,
              "table_full_ms": table.full_ms, "cost_models": models, "points": points,
              "searches": heads}
    with open(os.path.join(args.output_dir, "autoslim_latency.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| latency measured | Spearman GFLOPs | Spearman table | table mean abs error |",
             "|---|---|---|---|"]
    for measured, m in models.items():
        lines.append(f"| {measured} | {m['spearman_gflops']:.2f} | {m['spearman_table']:.2f} | "
                     f"{100 * m['table_mean_abs_error']:.1f}% |")
    lines += ["", "| target ms | configuration | table ms | fixed ms | end-to-end ms | GFLOPs | "
              "box AP | mask AP |", "|---|---|---|---|---|---|---|---|"]
    for r in heads:
        s = r["supernet"]
        lines.append(f"| {r['target_ms']:g} | {r['kind']} | {r['table_ms']:.1f} | "
                     f"{r['fixed_ms']:.1f} | {r['e2e_ms']:.1f} | {r['gflops']:.2f} | "
                     f"{s['box_ap']:.1f} | {s['mask_ap']:.1f} |")
    table_md = "\n".join(lines)
    with open(os.path.join(args.output_dir, "autoslim_latency.md"), "w") as f:
        f.write(table_md + "\n")
    print(table_md)
    return result


if __name__ == "__main__":
    main()
