#!/usr/bin/env python
"""Slim model at width w vs. its exported plain model: latency ratio (target <= 1.05).

    python benchmarks/export_overhead.py [--size 512] [--repeats 7] [--widths 1.0 0.5 0.25]
        [--config-file CONFIG] [--threads 1 --cpu-time] [--control] [KEY VALUE ...]

Both models run the same input in alternation (so machine drift hits both alike); the slim
model runs its layers on slices of its full tensors, the exported one holds only that width's
tensors. Default models: the R-50-FPN Mask R-CNN of each ``--scopes``; ``--config-file`` takes
any slim config instead (e.g. the shapes demo model, whose forward is short enough for per-call
costs to show).

What the gap is made of, counted per forward (exact, unlike times): ATen ops (torch.profiler
events) and Python function calls (``sys.setprofile`` "call" events) of each model.

``--cpu-time`` (with ``--threads 1``) times the calling thread's CPU time instead of the wall
clock: time spent waiting for a core another process holds is not counted, so the ratio holds
on a machine that is not idle. ``--control`` times a copy of the plain model in the same
alternation: its ratio to the plain model is the noise floor of the measurement.
"""
import copy
import os
import statistics
import sys
import time

import _common
import torch

import slim_det
from slim_det.export import export_width, verify_export

TARGET = 1.05


def _run_ms(model, inputs, clock):
    with torch.no_grad():
        _common.synchronize()
        start = clock()
        model(inputs)
        _common.synchronize()
        return (clock() - start) * 1000.0


def alternated_ms(models, inputs, warmup, repeats, clock):
    """Median milliseconds per model, the models alternated run by run."""
    times = {name: [] for name in models}
    for run in range(warmup + repeats):
        for name, model in models.items():
            ms = _run_ms(model, inputs, clock)
            if run >= warmup:
                times[name].append(ms)
    return {name: statistics.median(values) for name, values in times.items()}


def counts_per_forward(model, inputs):
    """(ATen ops, Python function calls) of one forward of ``model`` on ``inputs``."""
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(inputs)
        ops = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
        calls = [0]

        def count(frame, event, arg):
            if event == "call":
                calls[0] += 1

        sys.setprofile(count)
        try:
            model(inputs)
        finally:
            sys.setprofile(None)
    return ops, calls[0]


def parse_args(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], repeats=7)
    p.add_argument("--config-file", help="a slim config to build instead of the --scopes models")
    p.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU time "
                   "(needs --threads 1)")
    p.add_argument("--control", action="store_true", help="also time a copy of the plain model")
    args = _common.parse(p, argv)
    if args.cpu_time and args.threads != 1:
        p.error(f"--cpu-time counts the calling thread only, so it needs --threads 1; got "
                f"--threads {args.threads}.")
    if args.cpu_time and args.device != "cpu":
        p.error(f"--cpu-time measures CPU inference; got --device {args.device}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    inputs = _common.random_images(args.batch, args.size)
    models = ([(os.path.basename(args.config_file), args.config_file)] if args.config_file
              else [(scope, None) for scope in args.scopes])
    rows = []
    for scope, config_file in models:
        cfg, model = _common.build_slim_model(args, scope, config_file)
        for width in sorted(args.widths, reverse=True):
            _, plain, kind = export_width(model, cfg, width)
            plain.eval()
            difference = verify_export(model, plain, width, inputs)
            timed = {"slim": model, "plain": plain}
            if args.control:
                timed["control"] = copy.deepcopy(plain)
            with slim_det.using_width(model, width):
                ms = alternated_ms(timed, inputs, args.warmup, args.repeats, clock)
                slim_ops, slim_calls = counts_per_forward(model, inputs)
            plain_ops, plain_calls = counts_per_forward(plain, inputs)
            row = {
                "scope": scope,
                "width": width,
                "export": kind,
                "slim_ms": ms["slim"],
                "plain_ms": ms["plain"],
                "difference_ms": ms["slim"] - ms["plain"],
                "ratio": ms["slim"] / ms["plain"],
                "meets_target": ms["slim"] / ms["plain"] <= TARGET,
                "slim_aten_ops": slim_ops,
                "plain_aten_ops": plain_ops,
                "slim_python_calls": slim_calls,
                "plain_python_calls": plain_calls,
                "max_feature_difference": difference["features"],
            }
            if args.control:
                row["control_ratio"] = ms["control"] / ms["plain"]
            rows.append(row)
            del plain, timed
    columns = [
        ("scope", "model", "{}"), ("width", "width", "{:g}"), ("export", "export", "{}"),
        ("slim_ms", "slim ms", "{:.2f}"), ("plain_ms", "plain ms", "{:.2f}"),
        ("ratio", "slim/plain", "{:.3f}"),
    ] + ([("control_ratio", "copy/plain", "{:.3f}")] if args.control else []) + [
        ("meets_target", f"<= {TARGET}", "{}"),
        ("slim_aten_ops", "slim ops", "{}"), ("plain_aten_ops", "plain ops", "{}"),
        ("slim_python_calls", "slim py calls", "{}"), ("plain_python_calls", "plain py calls", "{}"),
    ]
    result = {
        "benchmark": "export_overhead",
        "target_ratio": TARGET,
        "clock": "thread CPU time" if args.cpu_time else "wall",
        "command": " ".join(["python", "benchmarks/export_overhead.py"]
                           + (sys.argv[1:] if argv is None else list(argv))),
        "environment": _common.environment(args),
        "rows": rows,
    }
    _common.emit(result, _common.format_table(rows, columns), args.json_out)
    return result


if __name__ == "__main__":
    main()
