#!/usr/bin/env python
"""Slim model at width w vs. its exported plain model: latency ratio (target <= 1.05).

    python benchmarks/export_overhead.py [--size 512] [--repeats 7] [--widths 1.0 0.5 0.25]

Both models run the same image in alternation (so machine drift hits both alike); the slim
model slices its full tensors on every call, the exported one holds only that width's tensors.
"""
import _common

import slim_det
from slim_det.export import export_width, verify_export

TARGET = 1.05


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], repeats=7)
    args = _common.parse(p, argv)
    inputs = _common.random_images(args.batch, args.size)
    rows = []
    for scope in args.scopes:
        cfg, model = _common.build_slim_model(args, scope)
        for width in sorted(args.widths, reverse=True):
            _, plain, kind = export_width(model, cfg, width)
            plain.eval()
            difference = verify_export(model, plain, width, inputs)
            with slim_det.using_width(model, width):
                ms = _common.interleaved_latency(
                    {"slim": model, "plain": plain}, inputs, args.warmup, args.repeats
                )
            rows.append({
                "scope": scope,
                "width": width,
                "export": kind,
                "slim_ms": ms["slim"],
                "plain_ms": ms["plain"],
                "ratio": ms["slim"] / ms["plain"],
                "meets_target": ms["slim"] / ms["plain"] <= TARGET,
                "max_feature_difference": difference["features"],
            })
            del plain
    table = _common.format_table(rows, [
        ("scope", "scope", "{}"), ("width", "width", "{:g}"), ("export", "export", "{}"),
        ("slim_ms", "slim ms", "{:.0f}"), ("plain_ms", "plain ms", "{:.0f}"),
        ("ratio", "slim/plain", "{:.3f}"), ("meets_target", f"<= {TARGET}", "{}"),
    ])
    result = {
        "benchmark": "export_overhead",
        "target_ratio": TARGET,
        "environment": _common.environment(args),
        "rows": rows,
    }
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
