#!/usr/bin/env python
"""One slim training step (every width) vs. the sum of stock single-width steps (target <= 1.0).

    python benchmarks/train_step.py [--size 512] [--batch 2] [--repeats 2] [--scopes all]

The slim step is `slim_det.engine.train_loop.slim_forward_backward` (each width forward + backward
on the same batch). Each stock step is one forward + backward of the plain detectron2 model of
that width (built from the exported config) on the same batch. Peak memory is what the step adds
on top of the loaded model (CUDA allocator peak, or sampled RSS on CPU), from the first step.
"""
import statistics

import _common
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from slim_det.engine.train_loop import slim_forward_backward
from slim_det.export import exported_config

TARGET = 1.0


def stock_step(model, data):
    losses = sum(model(data).values())
    losses.backward()


def measure(step, model, warmup, repeats):
    """(median seconds, peak MiB of the first run) of ``step()`` with fresh gradients each run."""
    times, peak = [], None
    for run in range(max(warmup, 1) + repeats):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(run)  # same proposal sampling for the slim and the stock models
        memory = _common.PeakMemory(next(model.parameters()).device)
        start = _common.now()
        if peak is None:
            with memory:
                step()
            peak = memory.mib
        else:
            step()
        if run >= max(warmup, 1):
            times.append(_common.now() - start)
    return statistics.median(times), peak


def benchmark_scope(args, scope):
    cfg, model = _common.build_slim_model(args, scope)
    data = _common.random_training_batch(args.batch, args.size, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    widths = sorted(args.widths, reverse=True)
    model.train()
    slim_s, slim_mib = measure(
        lambda: slim_forward_backward(model, data, widths), model, args.warmup, args.repeats
    )
    stock = {}
    for width in widths:
        plain_cfg, _ = exported_config(model, cfg, width)
        plain = build_model(plain_cfg).train()
        stock[width] = measure(lambda: stock_step(plain, data), plain, args.warmup, args.repeats)
        del plain
    stock_s = sum(s for s, _ in stock.values())
    return {
        "scope": scope,
        "widths": widths,
        "slim_step_s": slim_s,
        "stock_steps_s": {str(w): s for w, (s, _) in stock.items()},
        "stock_sum_s": stock_s,
        "ratio": slim_s / stock_s,
        "meets_target": slim_s / stock_s <= TARGET,
        "slim_peak_mib": slim_mib,
        "stock_peak_mib": {str(w): m for w, (_, m) in stock.items()},
    }


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], batch=2, warmup=1, repeats=2)
    args = _common.parse(p, argv)
    rows = []
    with EventStorage():  # detectron2's training forward logs into it
        for scope in args.scopes:
            rows.append(benchmark_scope(args, scope))
    table = _common.format_table(rows, [
        ("scope", "scope", "{}"), ("slim_step_s", "slim step s", "{:.2f}"),
        ("stock_sum_s", "sum of stock steps s", "{:.2f}"), ("ratio", "ratio", "{:.3f}"),
        ("meets_target", f"<= {TARGET}", "{}"), ("slim_peak_mib", "slim peak MiB", "{:.0f}"),
    ])
    lines = [table]
    for row in rows:
        per_width = ", ".join(
            f"w{w}: {row['stock_steps_s'][w]:.2f} s / {row['stock_peak_mib'][w]:.0f} MiB"
            for w in row["stock_steps_s"]
        )
        lines.append(f"stock steps ({row['scope']}): {per_width}")
    result = {
        "benchmark": "train_step",
        "target_ratio": TARGET,
        "environment": _common.environment(args),
        "rows": rows,
    }
    _common.emit(result, "\n".join(lines), args.json_out)
    return result


if __name__ == "__main__":
    main()
