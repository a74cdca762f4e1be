#!/usr/bin/env python
"""Which CPU convolution path is fastest for the convolutions each width really runs.

    python benchmarks/conv_paths.py [--models shapes r50] [--size N] [--threads 2] [--repeats 5]

PyTorch picks, per call, oneDNN (aten::mkldnn_convolution) or its native im2col + GEMM kernel
(aten::_slow_conv2d_forward): for a batch of one image whose input has at most 20480 values and a
kernel of at most 3x3, or for a 1x1 stride-1 conv on one thread, the native one. Narrow widths
make many inputs that small. This benchmark records every conv call of one detector forward per
width (forward hooks on the slimmable convs), then times each distinct call (alternating the
variants, fastest of ``--repeats``) as

- default: what the slim model runs, F.conv2d on the sliced weight view;
- contiguous: F.conv2d on a contiguous copy of the slice (what a per-width weight cache gives);
- mkldnn: aten::mkldnn_convolution forced;
- native: aten::_slow_conv2d_forward forced (plain convs only; depthwise ones count as default),

and sums them over the forward. The JSON row also has the calls that default sends to each path
and the largest output difference of each variant from default (contiguous: bit for bit).
"""
import collections

import _common
import profile_widths
import torch
import torch.nn.functional as F

import slim_det
from slim_det.layers import SlimConv2d

VARIANTS = ("default", "contiguous", "mkldnn", "native")


def conv_calls(model, inputs):
    """{(input shape, weight out / in slice, stride, padding, dilation, groups): calls} of one
    forward of ``model`` at its width (the layer of each distinct call kept for its weight)."""
    calls, layers = collections.Counter(), {}

    def record(layer, args):
        x = args[0]
        out, in_per_group, groups = layer.active_shape(x.shape[1])
        key = (tuple(x.shape), out, in_per_group, layer.stride, layer.padding, layer.dilation,
               groups)
        calls[key] += 1
        layers.setdefault(key, layer)

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if isinstance(m, SlimConv2d)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, layers


def variants(key, layer):
    """{variant: zero-argument function running the conv of ``key`` that way}."""
    shape, out, in_per_group, stride, padding, dilation, groups = key
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(layer.weight.device)
    weight = layer.weight[:out, :in_per_group]
    bias = None if layer.bias is None else layer.bias[:out]
    dense = weight.contiguous()
    run = {
        "default": lambda: F.conv2d(x, weight, bias, stride, padding, dilation, groups),
        "contiguous": lambda: F.conv2d(x, dense, bias, stride, padding, dilation, groups),
        "mkldnn": lambda: torch.ops.aten.mkldnn_convolution(
            x, dense, bias, list(padding), list(stride), list(dilation), groups),
    }
    run["native"] = run["default"] if groups > 1 else lambda: torch.ops.aten._slow_conv2d_forward(
        x, dense, list(dense.shape[2:]), bias, list(stride), list(padding))
    return run


def default_path(fn):
    """The aten kernel F.conv2d dispatches this call to."""
    with torch.profiler.profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    for path, op in (("mkldnn", "aten::mkldnn_convolution"), ("native", "aten::_slow_conv2d_forward"),
                     ("native", "aten::_slow_conv2d_forward.output")):
        if op in names:
            return path
    return "other"


def timed_ms(fn):
    start = _common.now()
    fn()
    return (_common.now() - start) * 1000.0


def profile(args, model, inputs):
    calls, layers = conv_calls(model, inputs)
    totals = dict.fromkeys(VARIANTS, 0.0)
    paths, difference = collections.Counter(), dict.fromkeys(VARIANTS[1:], 0.0)
    with torch.no_grad():
        for key, count in calls.items():
            run = variants(key, layers[key])
            if args.device != "cpu":
                run = {"default": run["default"], "contiguous": run["contiguous"]}
            paths[default_path(run["default"]) if args.device == "cpu" else args.device] += count
            reference = run["default"]()  # (these first calls are the warm-up)
            for name in list(run)[1:]:
                difference[name] = max(difference[name],
                                       (run[name]() - reference).abs().max().item())
            times, names = {name: float("inf") for name in run}, list(run)
            # Alternate, each repeat starting at another variant: machine drift and cache
            # warmth from the previous call hit every variant alike.
            for repeat in range(max(1, args.repeats)):
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    times[name] = min(times[name], timed_ms(run[name]))
            for name in run:
                totals[name] += count * times[name]
    return {"conv_calls": sum(calls.values()), "distinct_calls": len(calls),
            "default_paths": dict(paths), "ms": totals, "max_difference": difference}


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], size=0, repeats=5)
    p.add_argument("--models", nargs="+", default=["shapes", "r50"],
                   choices=sorted(profile_widths.DEFAULT_SIZES))
    args = _common.parse(p, argv)
    args.sizes_of = lambda name: [args.size] if args.size else list(
        profile_widths.DEFAULT_SIZES[name])
    args.shapes_weights = args.r50_weights = None  # the calls depend on shapes, not on weights
    args.score_thresh = 0.0
    rows = []
    for name in args.models:
        for scope in args.scopes if name == "r50" else [None]:
            cfg, model, _ = profile_widths.build(args, name, scope)
            for size in args.sizes_of(name):
                inputs = _common.random_images(args.batch, size)
                for width in sorted(args.widths, reverse=True):
                    with slim_det.using_width(model, width):
                        row = {"model": name, "scope": cfg.MODEL.SLIM.SCOPE, "size": size,
                               "width": width}
                        row.update(profile(args, model, inputs))
                    rows.append(row)
    flat = [dict(r, **{f"{k}_ms": v for k, v in r["ms"].items()},
                 native_calls=r["default_paths"].get("native", 0),
                 mkldnn_calls=r["default_paths"].get("mkldnn", 0)) for r in rows]
    table = _common.format_table(flat, [
        ("model", "model", "{}"), ("size", "px", "{}"), ("width", "width", "{:g}"),
        ("conv_calls", "convs", "{}"), ("native_calls", "native", "{}"),
        ("mkldnn_calls", "mkldnn", "{}"), ("default_ms", "default ms", "{:.1f}"),
        ("contiguous_ms", "contiguous ms", "{:.1f}"), ("mkldnn_ms", "all mkldnn ms", "{:.1f}"),
        ("native_ms", "all native ms", "{:.1f}"),
    ])
    result = {"benchmark": "conv_paths", "environment": _common.environment(args), "rows": rows}
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
