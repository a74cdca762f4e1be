#!/usr/bin/env python
"""The S-Nets claim, measured: one slimmable detector vs detectors trained individually per width.

    python benchmarks/fidelity.py [--config-file configs/shapes/slim_mask_rcnn_shapes.yaml]
        [--seeds 0 1 2] [--iters N] [--widths 1.0 0.75 0.5 0.25] [--output-dir output/fidelity]
        [--num-gpus 1] [--jobs 1] [KEY VALUE ...]

For each seed it trains the slimmable model once (all widths every iteration) and one plain model
per width (``MODEL.SLIM.INDIVIDUAL_WIDTH``), each by running ``tools/train_net.py`` (the user's
path) in a subprocess, into ``<output-dir>/<family>[/w<width>]/seed<seed>``, with the same config,
iterations, seed and evaluation images. Then it prints and writes (``fidelity.{json,md}``,
``fidelity_ap_vs_gflops.png``) per width and metric: individual → slimmable AP, mean ± std and min
over seeds, the difference, and each family's training time. With ``TEST.EVAL_PERIOD`` among the
options it adds box AP during training, per family, width and evaluated iteration (mean over
seeds; ``learning_curve`` in the JSON): whether the schedule was long enough.

A finished run (its ``fidelity_run.json`` and ``<dataset>/width_table.json`` present) is reused,
so an interrupted benchmark continues where it stopped; an unfinished one restarts with
``--resume`` (from its last checkpoint, if any).
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import time

# This checkout's slim_det, here and in the subprocesses, even if another copy is installed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _common  # noqa: E402
import _fidelity_table as table  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402

import slim_det  # noqa: F401,E402  (registers the shapes datasets, shapes_val_large included)
from slim_det.config import load_slim_cfg, scaled_lr_steps  # noqa: E402
from slim_det.engine.report import TASK_METRICS  # noqa: E402
from slim_det.width import width_key  # noqa: E402

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes", "slim_mask_rcnn_shapes.yaml")
TINY_CONFIG = os.path.join(REPO, "configs", "tests", "tiny.yaml")
RUN_FILE = "fidelity_run.json"
# Keys the benchmark sets itself; letting an extra opt change them would break the comparison.
OWNED_KEYS = ("OUTPUT_DIR", "SEED", "SOLVER.MAX_ITER", "DATASETS.TEST", "MODEL.SLIM.WIDTHS",
              "MODEL.SLIM.INDIVIDUAL_WIDTH", "MODEL.SLIM.TEST_WIDTHS")


def _widths_opt(widths):
    return "[" + ", ".join(f"{w:g}" for w in sorted(widths)) + "]"


# --- families: each yields (folder under the output dir, the width it is evaluated at or None
# for all of --widths, its config opts). A new family (e.g. AutoSlim) is one more function here.
def slimmable_family(args, cfg):
    yield "slimmable", None, ["MODEL.SLIM.WIDTHS", _widths_opt(args.widths)]


def individual_family(args, cfg):
    for width in sorted(args.widths, reverse=True):
        weights = args.individual_weights.get(width)
        yield (f"individual/w{width:g}", width,
               ["MODEL.SLIM.WIDTHS", _widths_opt(args.widths), "MODEL.SLIM.INDIVIDUAL_WIDTH", width]
               + (["MODEL.WEIGHTS", weights] if weights else []))


def universal_family(args, cfg):
    # Universally slimmable training (US-Nets, MODEL.SLIM.MODE "universal") over the range the
    # --widths span, evaluated at exactly those widths so its rows line up with the others.
    widths = _widths_opt(args.widths)
    yield "universal", None, ["MODEL.SLIM.MODE", "universal",
                              "MODEL.SLIM.WIDTH_RANGE", f"[{min(args.widths)!r}, 1.0]",
                              "MODEL.SLIM.WIDTHS", widths, "MODEL.SLIM.TEST_WIDTHS", widths]


FAMILIES = {"individual": individual_family, "slimmable": slimmable_family,
            "universal": universal_family}


def add_run_arguments(p, default_seeds, tiny_help):
    """The flags every benchmark that trains through this runner takes, ``--families`` excepted."""
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {default_seeds} (--tiny: 0)")
    p.add_argument("--iters", type=int, help="SOLVER.MAX_ITER of every run (default: the "
                   "config's); SOLVER.STEPS scale with it")
    p.add_argument("--widths", type=float, nargs="+", help="default: the config's MODEL.SLIM.WIDTHS")
    p.add_argument("--output-dir", default="output/fidelity")
    p.add_argument("--num-gpus", type=int, default=1, help="passed to tools/train_net.py")
    p.add_argument("--device", help="MODEL.DEVICE of every run (default: the config's)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (a small model "
                   "leaves most of a GPU idle; each run is one train_net process)")
    p.add_argument("--small-val", action="store_true", help="evaluate on the config's "
                   "DATASETS.TEST even when a larger '<name>_large' split is registered")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")


def check_opts(p, args, owned_prefixes=(), flags="--output-dir, --seeds, --iters, --widths"):
    """Refuse odd KEY VALUE lists and keys the benchmark sets itself."""
    if len(args.opts) % 2:
        p.error(f"extra config options must be KEY VALUE pairs; got {args.opts}")
    owned = [k for k in args.opts[::2] if k in OWNED_KEYS or k.startswith(tuple(owned_prefixes))]
    if owned:
        p.error(f"{owned} are set by the benchmark (use {flags})")


def check_jobs(p, args):
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1; got {args.jobs}")


def run_all(runs, work, jobs):
    """``work(index, run)`` for every run, ``jobs`` at a time; results in the order of ``runs``.

    Each run is a train_net subprocess, so threads suffice; the first failure stops the rest
    from starting and is raised."""
    if jobs == 1:
        return [work(i, run) for i, run in enumerate(runs, 1)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(work, i, run) for i, run in enumerate(runs, 1)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(p, "0 1 2", "a tiny model, 3 iterations, 1 seed, widths 1.0 and 0.5 on "
                      "the 16 / 8 image data (tests)")
    p.add_argument("--families", nargs="+", default=["individual", "slimmable"],
                   choices=sorted(FAMILIES))
    p.add_argument("--individual-weights", nargs="+", default=[], metavar="WIDTH=PATH",
                   help="MODEL.WEIGHTS of the individual model of WIDTH (e.g. an ImageNet model "
                   "trained at that width, as S-Nets did); default: the config's, sliced")
    args = p.parse_args(argv)
    check_opts(p, args)
    check_jobs(p, args)
    if args.tiny:
        args.widths = args.widths or [1.0, 0.5]
        args.iters = args.iters or 3
        args.opts = _tiny_opts() + list(args.opts)
    args.seeds = args.seeds or ([0] if args.tiny else [0, 1, 2])
    args.individual_weights = dict(_width_path(p, item) for item in args.individual_weights)
    if args.device:
        args.opts += ["MODEL.DEVICE", args.device]
    return args


def _width_path(parser, item):
    width, _, path = item.partition("=")
    try:
        if path:
            return float(width), path
    except ValueError:
        pass
    parser.error(f"--individual-weights takes WIDTH=PATH items, e.g. 0.5=r50_w0.5.pth; got {item!r}")


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, str) else repr(value)


def _tiny_opts():
    """configs/tests/tiny.yaml as KEY VALUE opts (train_net takes one config file), tiny data."""
    with open(TINY_CONFIG) as f:
        opts = [item for pair in _flatten(yaml.safe_load(f)) for item in pair]
    return opts + ["DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST",
                   "('shapes_tiny_val',)"]


def eval_dataset(cfg, small_val):
    """The one dataset every model is evaluated on: ``<test set>_large`` when registered."""
    if len(cfg.DATASETS.TEST) != 1:
        raise SystemExit(f"The benchmark evaluates on one dataset; DATASETS.TEST is "
                         f"{list(cfg.DATASETS.TEST)}.")
    name = cfg.DATASETS.TEST[0]
    if not small_val and f"{name}_large" in DatasetCatalog.list():
        return f"{name}_large"
    return name


def schedule_opts(cfg, iters):
    """MAX_ITER = ``iters``, with the config's LR steps at the same fractions of the schedule."""
    if iters is None:
        return []
    if iters < 3:
        raise SystemExit(f"--iters must be at least 3 (detectron2's ETA printer); got {iters}.")
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", repr(scaled_lr_steps(cfg, iters))]


def plan_runs(args, cfg, dataset):
    """Every training run: dicts with family, seed, width, folder and the train_net command."""
    # The config's own opts first: the schedule and evaluation set are the benchmark's.
    base = list(args.opts) + schedule_opts(cfg, args.iters) + ["DATASETS.TEST", repr((dataset,))]
    runs = []
    for family in args.families:
        for sub, width, opts in FAMILIES[family](args, cfg):
            for seed in args.seeds:
                folder = os.path.join(args.output_dir, sub, f"seed{seed}")
                command = ["--config-file", os.path.abspath(args.config_file)] + base + opts + [
                    "SEED", str(seed), "OUTPUT_DIR", folder]
                runs.append({"family": family, "seed": seed, "width": width, "folder": folder,
                             "command": [str(c) for c in command]})
    return runs


def _finished(run, dataset):
    path = os.path.join(run["folder"], RUN_FILE)
    if not (os.path.isfile(path) and os.path.isfile(_table_path(run, dataset))):
        return None
    with open(path) as f:
        recorded = json.load(f)
    if recorded["command"] != run["command"]:
        before, now = _pairs(recorded["command"]), _pairs(run["command"])
        raise SystemExit(
            f"{run['folder']} holds a run made with other settings (recorded "
            f"{[p for p in before if p not in now]}, now {[p for p in now if p not in before]}). "
            "Use another --output-dir or delete that folder."
        )
    return recorded


def _pairs(command):
    return list(zip(command[::2], command[1::2]))


def _table_path(run, dataset):
    return os.path.join(run["folder"], dataset, "width_table.json")


def _log_times(folder):
    """detectron2's timings from the run's log (its last entry if the run was resumed).

    Returns:
        dict: ``train_s``: "Total training time" (the loop and its hooks, not the final
        evaluation; whole seconds); ``s_per_iter``: "Overall training speed" (iterations only,
        without the timer's first iterations; absent for runs of a few iterations).
    """
    try:
        with open(os.path.join(folder, "log.txt")) as f:
            text = f.read()
    except FileNotFoundError:
        return {"train_s": None, "s_per_iter": None}
    total = re.findall(r"Total training time: (?:(\d+) days?, )?(\d+):(\d+):(\d+)", text)
    speed = re.findall(r"Overall training speed: .* \(([\d.]+) s / it\)", text)
    train_s = None
    if total:
        days, h, m, sec = total[-1]
        train_s = int(days or 0) * 86400 + int(h) * 3600 + int(m) * 60 + int(sec)
    return {"train_s": train_s, "s_per_iter": float(speed[-1]) if speed else None}


def run_train_net(arguments, folder):
    """Run ``tools/train_net.py arguments`` with this checkout's slim_det, its output in
    ``folder/train_net.log``; return its wall time in seconds, or exit with the log's tail."""
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "train_net.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, TRAIN_NET] + arguments, stdout=out,
                              stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"tools/train_net.py failed (exit {code}) for {folder}:\n{tail}")
    return time.perf_counter() - start


def train(run, num_gpus):
    """Run tools/train_net.py for ``run``; write and return its ``fidelity_run.json`` record."""
    resumed = os.path.isfile(os.path.join(run["folder"], "last_checkpoint"))
    wall = run_train_net(["--num-gpus", str(num_gpus), "--resume"] + run["command"],
                         run["folder"])
    times = _log_times(run["folder"])
    if times["train_s"] is None:  # no detectron2 timing in the log: the subprocess's wall time
        times["train_s"] = wall
    record = dict(run, wall_s=wall, resumed=resumed, **times,
                  finished=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(os.path.join(run["folder"], RUN_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def records_of(run, dataset, widths):
    """One record per evaluated width of ``run`` (see `_fidelity_table`)."""
    with open(_table_path(run, dataset)) as f:
        rows = json.load(f)["rows"]
    wanted = [run["width"]] if run["width"] is not None else widths
    records = [dict(row, family=run["family"], seed=run["seed"]) for row in rows
               if any(abs(row["width"] - w) < 1e-9 for w in wanted)]
    if len(records) != len(wanted):
        raise SystemExit(f"{_table_path(run, dataset)} lacks widths {wanted}.")
    return records


def curve_records(run, widths, max_iter):
    """Every evaluation in the run's ``metrics.json``: one record per (iteration, width).

    With ``TEST.EVAL_PERIOD`` these include the periodic evaluations during training. The
    iteration is counted in steps done: ``metrics.json`` logs a periodic evaluation at the index
    of the step before it, the final one at ``max_iter``. A resumed run's log repeats
    iterations; the last entry of each wins.
    """
    path = os.path.join(run["folder"], "metrics.json")
    if not os.path.isfile(path):
        return []
    wanted = [run["width"]] if run["width"] is not None else widths
    found = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line) if line.strip() else {}
            for width in wanted:
                prefix = f"w{width_key(width)}/"
                values = {key: entry.get(f"{prefix}{task}/{metric}")
                          for key, (task, metric) in TASK_METRICS.items()}
                if values["box_ap"] is not None:
                    steps = min(entry["iteration"] + 1, max_iter)
                    found[steps, width] = dict(values, family=run["family"], seed=run["seed"],
                                               width=width, iteration=steps)
    return list(found.values())


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts)
    args.widths = sorted(set(args.widths or cfg.MODEL.SLIM.WIDTHS), reverse=True)
    unknown = sorted(set(args.individual_weights) - set(args.widths))
    if unknown:
        raise SystemExit(f"--individual-weights names widths {unknown} that are not in --widths "
                         f"{args.widths}.")
    if "slimmable" in args.families and args.widths[0] != 1.0:
        raise SystemExit(f"--widths must include 1.0 (the slimmable model's widest); got "
                         f"{args.widths}.")
    dataset = eval_dataset(cfg, args.small_val)
    args.output_dir = os.path.abspath(args.output_dir)
    runs = plan_runs(args, cfg, dataset)

    def train_or_reuse(i, run):
        what = f"[{i}/{len(runs)}] {run['family']}" + (
            f" w{run['width']:g}" if run["width"] is not None else "") + f" seed {run['seed']}"
        record = _finished(run, dataset)
        if record is None:
            print(f"{what}: training -> {run['folder']}", flush=True)
            record = train(run, args.num_gpus)
            record["reused"] = False
        else:
            print(f"{what}: reused {run['folder']}", flush=True)
            record["reused"] = True
        return record

    done = run_all(runs, train_or_reuse, args.jobs)

    records = [r for run in done for r in records_of(run, dataset, args.widths)]
    rows = table.aggregate(records, args.families)
    times = table.time_summary(done, args.families)
    max_iter = args.iters or cfg.SOLVER.MAX_ITER
    evaluations = [r for run in done for r in curve_records(run, args.widths, max_iter)]
    curve = [p for key, _ in table.METRICS
             for p in table.learning_curve(evaluations, args.families, key)]
    md = (f"Evaluated on {dataset}; {len(args.seeds)} seed(s) {args.seeds}; "
          f"{max_iter} iterations per run; config {args.config_file}.\n\n"
          + table.markdown_table(rows, args.families) + "\n\n" + table.markdown_times(times) + "\n")
    if len({p["iteration"] for p in curve}) > 1:  # evaluated during training (TEST.EVAL_PERIOD)
        md += "\n" + table.markdown_curve([p for p in curve if p["metric"] == "box_ap"],
                                          "box AP") + "\n"
    runs = [{k: r.get(k) for k in ("family", "seed", "width", "folder", "train_s", "s_per_iter",
                                   "wall_s", "reused", "resumed")} for r in done]
    return write_result("fidelity", args, cfg, dataset, rows, times, md,
                        {"runs": runs, "learning_curve": curve})


def write_result(name, args, cfg, dataset, rows, times, md, extra):
    """Write ``<name>.md``, ``<name>_ap_vs_gflops.png`` and ``<name>.json`` (with ``extra``)
    into the output dir; print the table and the JSON; return the JSON result."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"{name}.md"), "w") as f:
        f.write(md)
    plot = table.plot(rows, args.families,
                      os.path.join(args.output_dir, f"{name}_ap_vs_gflops.png"))
    result = {
        "benchmark": name,
        "environment": {
            # A table assembled from finished runs on a machine without the GPU says "cuda".
            "device": torch.cuda.get_device_name() if cfg.MODEL.DEVICE.startswith("cuda")
            and torch.cuda.is_available() else cfg.MODEL.DEVICE,
            "num_gpus": args.num_gpus, "torch": torch.__version__, "tiny": args.tiny,
            "load_average_1m": os.getloadavg()[0],
        },
        "config": args.config_file, "eval_dataset": dataset, "seeds": args.seeds,
        "iters": args.iters or cfg.SOLVER.MAX_ITER, "widths": args.widths,
        "families": args.families, "opts": args.opts, "rows": rows, "times": times,
        "plot": plot, **extra,
    }
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    _common.emit(result, md, args.json_out)
    return result


if __name__ == "__main__":
    main()
