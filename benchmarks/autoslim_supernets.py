#!/usr/bin/env python
"""Which supernet evaluates channel configurations better: the same configurations in several.

    python benchmarks/autoslim_supernets.py \\
        --supernet uniform configs/shapes/slim_universal_mask_rcnn_shapes.yaml output/supernet/model_final.pth \\
        --supernet per_group configs/shapes/slim_universal_per_group_mask_rcnn_shapes.yaml output/supernet_pg/model_final.pth \\
        --configs output/autoslim/gflops_1.5.json output/autoslim_pg/gflops_1.5.json ... \\
        [--widths 1 0.75 0.5 0.25] [--random 8] [--output-dir output/autoslim_supernets]

Every configuration (the uniform ``--widths``, the ``--configs`` files, and ``--random``
configurations with per-group fractions drawn in [0.25, 1] at costs spread over the range, seeded)
is evaluated inside every supernet: batch norms calibrated on TEST.CALIBRATION_IMAGES training
images, box and mask AP on DATASETS.TEST[0]. The supernets must share one architecture (their
configs may differ in training settings only). Prints JSON lines and a table (one column per
supernet, and the mean over the uniform widths and over the non-uniform configurations); writes
``autoslim_supernets.{json,md}``.
"""
import argparse
import importlib.util
import json
import os
import random
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.modeling import build_model  # noqa: E402

import slim_det  # noqa: E402,F401
from slim_det.autoslim import ConvCost  # noqa: E402
from slim_det.calibration import build_calibration_loader  # noqa: E402
from slim_det.channels import channel_groups, load_channels, uniform_channels  # noqa: E402
from slim_det.config import load_slim_cfg  # noqa: E402
from slim_det.weights import load_weights  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "autoslim_benchmark", os.path.join(REPO, "benchmarks", "autoslim.py"))
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--supernet", nargs=3, action="append", required=True,
                   metavar=("NAME", "CONFIG", "WEIGHTS"), help="a supernet (repeat)")
    p.add_argument("--configs", nargs="*", default=[], help="channel configuration JSON files")
    p.add_argument("--widths", type=float, nargs="*", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--random", type=int, default=8, help="random configurations")
    p.add_argument("--output-dir", default="output/autoslim_supernets")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs (all supernets)")
    return p.parse_args(argv)


def _load(config_file, weights, opts):
    cfg = load_slim_cfg(config_file, opts + ["MODEL.WEIGHTS", weights])
    model = build_model(cfg)
    load_weights(cfg, model)
    return cfg, model.eval()


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    supernets = [(name, *_load(config, weights, args.opts))
                 for name, config, weights in args.supernet]
    _, cfg0, model0 = supernets[0]
    groups = channel_groups(model0)
    for name, _, model in supernets[1:]:
        if [g.name for g in channel_groups(model)] != [g.name for g in groups]:
            raise SystemExit(f"Supernet {name!r} has other channel groups than "
                             f"{supernets[0][0]!r}: compare supernets of one architecture.")
    size = cfg0.INPUT.MAX_SIZE_TEST
    cost = ConvCost(model0, (size, size), cfg0.MODEL.RPN.POST_NMS_TOPK_TEST,
                    cfg0.TEST.DETECTIONS_PER_IMAGE)

    configs = [(f"uniform_{w:g}", uniform_channels(model0, w)) for w in args.widths]
    configs += [(os.path.relpath(path), load_channels(path)) for path in args.configs]
    rng = random.Random(0)
    smallest = cost({g.name: g.allowed[0] for g in groups})
    largest = cost({g.name: g.full for g in groups})
    for k in range(args.random):
        config = None
        while config is None:
            goal = smallest * 1.2 + (0.95 * largest - 1.2 * smallest) * (k + 0.5) / args.random
            config = _bench.random_config(groups, cost, goal, rng, tolerance=0.05)
        configs.append((f"random_{k}", config))

    rows = []
    for label, config in configs:
        row = {"config": label, "gflops": cost(config), "channels": dict(config), "ap": {}}
        for name, cfg, model in supernets:
            calibration, _ = build_calibration_loader(cfg, cfg.TEST.CALIBRATION_IMAGES)
            row["ap"][name] = _bench.evaluate_in_supernet(
                cfg, model, config, [list(b) for b in calibration], cfg.DATASETS.TEST[0])
        print(json.dumps({k: v for k, v in row.items() if k != "channels"}), flush=True)
        rows.append(row)

    names = [name for name, _, _ in supernets]

    def fmt(value):
        return "-" if value is None else f"{value:.1f}"

    def mean_of(selected, name, metric):
        values = [r["ap"][name][metric] for r in selected if r["ap"][name][metric] is not None]
        return statistics.mean(values) if values else float("nan")

    uniform = [r for r in rows if r["config"].startswith("uniform_")]
    other = [r for r in rows if not r["config"].startswith("uniform_")]
    summary = {name: {"uniform_box_ap": mean_of(uniform, name, "box_ap"),
                      "non_uniform_box_ap": mean_of(other, name, "box_ap")} for name in names}
    result = {"supernets": args.supernet, "rows": rows, "summary": summary}
    with open(os.path.join(args.output_dir, "autoslim_supernets.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| configuration | GFLOPs | " + " | ".join(f"box AP {n}" for n in names) + " | "
             + " | ".join(f"mask AP {n}" for n in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]
    for r in rows:
        lines.append(f"| {r['config']} | {r['gflops']:.2f} | "
                     + " | ".join(fmt(r["ap"][n]["box_ap"]) for n in names) + " | "
                     + " | ".join(fmt(r["ap"][n]["mask_ap"]) for n in names) + " |")
    for key, selected in (("uniform widths", uniform), ("non-uniform", other)):
        lines.append(f"| mean, {key} | | " + " | ".join(
            fmt(mean_of(selected, n, "box_ap")) for n in names) + " | " + " | ".join(
            fmt(mean_of(selected, n, "mask_ap")) for n in names) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "autoslim_supernets.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
