#!/usr/bin/env python
"""Switching width vs. loading another model from disk (target: a switch takes <= 1 ms).

    python benchmarks/switch.py [--switches 1000] [--repeats 5]

A switch is `slim_det.set_width` on the loaded slim model. The alternative is to keep one exported
plain model per width on disk and load the one needed: either its weights into an already built
model of that width (torch.load + load_state_dict), or from scratch (build_model +
DetectionCheckpointer.load), as a fresh process would.
"""
import statistics
import tempfile

import _common
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import slim_det
from slim_det.export import export_width, save_exported
from slim_det.width import SlimModule

TARGET_MS = 1.0


def time_switches(model, widths, switches):
    times = []
    for i in range(switches):
        start = _common.now()
        slim_det.set_width(model, widths[i % len(widths)])
        times.append((_common.now() - start) * 1000.0)
    return times


def time_loads(plain_cfg, weights, repeats):
    built = build_model(plain_cfg)
    state, full = [], []
    for _ in range(repeats):
        start = _common.now()
        checkpoint = torch.load(weights, map_location=plain_cfg.MODEL.DEVICE)
        built.load_state_dict(checkpoint["model"])
        state.append((_common.now() - start) * 1000.0)
        start = _common.now()
        model = build_model(plain_cfg)
        DetectionCheckpointer(model).load(weights)
        full.append((_common.now() - start) * 1000.0)
    return state, full


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--switches", type=int, default=1000, help="width switches to time")
    p.add_argument("--load-width", type=float, default=0.5, help="width of the model loaded")
    args = _common.parse(p, argv)
    if args.tiny:
        args.switches = 50
    rows = []
    for scope in args.scopes:
        cfg, model = _common.build_slim_model(args, scope)
        switches = time_switches(model, sorted(args.widths), args.switches)
        plain_cfg, plain, _ = export_width(model, cfg, args.load_width)
        with tempfile.TemporaryDirectory() as directory:
            _, weights = save_exported(plain_cfg, plain, directory)
            state, full = time_loads(plain_cfg, weights, args.repeats)
        rows.append({
            "scope": scope,
            "switch_median_ms": statistics.median(switches),
            "switch_max_ms": max(switches),
            "load_weights_ms": statistics.median(state),
            "build_and_load_ms": statistics.median(full),
            "meets_target": statistics.median(switches) <= TARGET_MS,
            "slim_layers": sum(isinstance(m, SlimModule) for m in model.modules()),
        })
    table = _common.format_table(rows, [
        ("scope", "scope", "{}"), ("switch_median_ms", "switch ms (median)", "{:.3f}"),
        ("switch_max_ms", "switch ms (max)", "{:.3f}"),
        ("load_weights_ms", "load weights ms", "{:.0f}"),
        ("build_and_load_ms", "build+load ms", "{:.0f}"),
        ("meets_target", f"switch <= {TARGET_MS} ms", "{}"),
    ])
    result = {
        "benchmark": "switch",
        "target_switch_ms": TARGET_MS,
        "switches": args.switches,
        "load_width": args.load_width,
        "environment": _common.environment(args),
        "rows": rows,
    }
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
