#!/usr/bin/env python
"""ROIAlign backward on CPU: torchvision's kernel vs slim_det's channel-parallel one.

    python benchmarks/roi_align_backward.py [--repeats 5] [--threads 2]

Cases are the shapes demo's poolers at width 1 and 0.25 (8 images, the p2 level of 128 px
inputs, 64 sampled ROIs per image into the box pooler, a quarter of them into the mask pooler)
plus a coarser level. Reports the median backward time of each and whether the two gradients are
bit-identical.
"""
import statistics

import _common
import torch
from torchvision.ops import roi_align

from slim_det.roi_align import ParallelBackwardROIAlign

# (name, pooled size, channels, feature side, ROIs over the 8 images)
CASES = [
    ("box p2, width 1", (7, 7), 128, 32, 512),
    ("mask p2, width 1", (14, 14), 128, 32, 128),
    ("box p2, width 0.25", (7, 7), 32, 32, 512),
    ("box p4, width 1", (7, 7), 128, 8, 100),
]
TINY_CASES = [("tiny", (7, 7), 16, 16, 32)]


def _rois(num, images, side, generator):
    batch = torch.randint(0, images, (num,), generator=generator).sort().values.float()
    corner = torch.rand(num, 2, generator=generator) * side * 3
    size = torch.rand(num, 2, generator=generator) * side * 1.5 + side * 0.3
    return torch.cat([batch[:, None], corner, corner + size], dim=1)


def _backward_time(pool, x, rois, grad, warmup, repeats):
    times, result = [], None
    for run in range(warmup + repeats):
        out = pool(x, rois)
        start = _common.now()
        (result,) = torch.autograd.grad(out, x, grad)
        if run >= warmup:
            times.append(_common.now() - start)
    return statistics.median(times), result


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], batch=8, warmup=1, repeats=5)
    args = _common.parse(p, argv)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, pooled, channels, side, num in TINY_CASES if args.tiny else CASES:
        x = torch.randn(args.batch, channels, side, side, generator=generator, requires_grad=True)
        rois = _rois(num, args.batch, side, generator)
        grad = torch.randn(num, channels, *pooled, generator=generator)
        ours = ParallelBackwardROIAlign(pooled, 0.25, 0, True)
        stock_s, stock_grad = _backward_time(
            lambda a, b: roi_align(a, b, pooled, 0.25, 0, True), x, rois, grad, args.warmup,
            args.repeats,
        )
        ours_s, ours_grad = _backward_time(ours, x, rois, grad, args.warmup, args.repeats)
        rows.append({
            "case": name, "channels": channels, "rois": num,
            "torchvision_ms": 1000 * stock_s, "parallel_ms": 1000 * ours_s,
            "speedup": stock_s / ours_s, "bit_identical": bool(torch.equal(stock_grad, ours_grad)),
        })
    table = _common.format_table(rows, [
        ("case", "case", "{}"), ("torchvision_ms", "torchvision ms", "{:.1f}"),
        ("parallel_ms", "parallel ms", "{:.1f}"), ("speedup", "speedup", "{:.2f}"),
        ("bit_identical", "bit-identical", "{}"),
    ])
    result = {"benchmark": "roi_align_backward", "environment": _common.environment(args),
              "rows": rows}
    _common.emit(result, table, args.json_out)
    return result


if __name__ == "__main__":
    main()
