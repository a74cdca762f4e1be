#!/usr/bin/env python
"""Cost of each width and scope: parameters, GFLOPs, latency of the detector and its backbone.

    python benchmarks/widths.py [--size 512] [--repeats 5] [--scopes backbone all] [--no-flops]

"backbone" latency is the backbone with its FPN on the preprocessed image batch; "detector" is the
whole model (preprocessing, backbone, RPN, ROI heads, postprocessing) in eval mode.
"""
import _common
import torch

import slim_det
from slim_det.analysis import active_parameter_count, flops, latency_ms


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], scopes=("backbone", "all"))
    p.add_argument("--no-flops", action="store_true", help="skip the (slow) FLOP count")
    args = _common.parse(p, argv)
    inputs = _common.random_images(args.batch, args.size)
    rows = []
    for scope in args.scopes:
        _, model = _common.build_slim_model(args, scope)
        with torch.no_grad():
            images = model.preprocess_image(inputs).tensor
        for width in sorted(args.widths, reverse=True):
            with slim_det.using_width(model, width):
                rows.append({
                    "scope": scope,
                    "width": width,
                    "params_m": active_parameter_count(model, inputs) / 1e6,
                    "gflops": None if args.no_flops else flops(model, inputs) / 1e9,
                    "detector_ms": latency_ms(model, inputs, args.warmup, args.repeats),
                    "backbone_ms": latency_ms(model.backbone, images, args.warmup, args.repeats),
                })
        del model
    table = _common.format_table(rows, [
        ("scope", "scope", "{}"), ("width", "width", "{:g}"), ("params_m", "params (M)", "{:.1f}"),
        ("gflops", "GFLOPs", "{:.1f}"), ("detector_ms", "detector ms", "{:.0f}"),
        ("backbone_ms", "backbone+FPN ms", "{:.0f}"),
    ])
    result = {"benchmark": "widths", "environment": _common.environment(args), "rows": rows}
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
