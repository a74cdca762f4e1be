#!/usr/bin/env python
"""Switchable vs universally slimmable detectors (US-Nets), with and without inplace distillation.

    python benchmarks/universal.py [--config-file configs/shapes/slim_mask_rcnn_shapes.yaml]
        [--seeds 0 1] [--iters N] [--widths 1.0 0.75 0.5 0.25] [--between 0.85 0.6 0.4]
        [--families switchable universal universal_distill ...] [--output-dir output/fidelity]
        [--distill NAME="KEY VALUE ..."] [--num-gpus 1] [--jobs 1] [KEY VALUE ...]

Every family trains with the same config, schedule and seeds, through `fidelity.py`'s runner
(``tools/train_net.py`` in a subprocess, one folder per run, finished runs reused): the
``switchable`` and ``universal`` runs *are* `fidelity.py`'s ``slimmable`` and ``universal`` runs
when both benchmarks share ``--output-dir``, ``--iters`` and options. Each trained model is then
evaluated once at the ``--widths`` and the ``--between`` widths with ``tools/train_net.py
--eval-only`` into ``<run>/spectrum`` (every width without statistics calibrated first on
TEST.CALIBRATION_IMAGES training images: all of a universal model's, the between widths of a
switchable one). It prints and writes ``universal.{json,md}`` and ``universal_ap_vs_gflops.png``:
per width, each family's AP mean ± std and min over seeds, and its difference from
``switchable``.

``--distill NAME="KEY VALUE ..."`` (repeatable) adds a family ``universal_distill_NAME``: the
universal model with inplace distillation and those ``MODEL.SLIM.DISTILL`` keys (written without
the prefix), e.g. ``--distill late_cls="START_ITER 150 RAMP_ITERS 100 RPN_WEIGHT 0 BOX_WEIGHT 0"``.
A recipe therefore gets its own family and folder while the other families' runs are reused.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _fidelity_table as table  # noqa: E402
import fidelity  # noqa: E402

from slim_det.config import load_slim_cfg  # noqa: E402

SPECTRUM = "spectrum"
SPECTRUM_FILE = "spectrum_run.json"
# Each inplace-distillation term alone: the other two weights 0 (slim_det/distill.py).
TERMS = {"rpn": "RPN_WEIGHT", "cls": "CLS_WEIGHT", "box": "BOX_WEIGHT"}


def _variant(name, keys):
    """Family ``name``: the universal model with inplace distillation and the
    ``MODEL.SLIM.DISTILL`` ``keys`` ((key, value) pairs, the prefix left out)."""

    def family(args, cfg):
        ((_, width, opts),) = fidelity.universal_family(args, cfg)
        extra = [item for key, value in keys for item in (f"MODEL.SLIM.DISTILL.{key}", value)]
        yield name, width, opts + ["MODEL.SLIM.DISTILL.ENABLED", "True"] + extra

    return family


def _distilled(terms):
    """A universal family with inplace distillation of ``terms`` (the others weighted 0)."""
    name = "universal_distill" + ("" if len(terms) == len(TERMS) else "_" + "_".join(terms))

    def family(args, cfg):
        keys = [(key, repr(float(cfg.MODEL.SLIM.DISTILL[key] if term in terms else 0.0)))
                for term, key in TERMS.items()]
        yield from _variant(name, keys)(args, cfg)

    return family


FAMILIES = {
    # fidelity.py's folder names, so the runs are shared with it.
    "switchable": fidelity.slimmable_family,
    "universal": fidelity.universal_family,
    "universal_distill": _distilled(tuple(TERMS)),
    **{f"universal_distill_{term}": _distilled((term,)) for term in TERMS},
}


def parse_variant(parser, item, distill_keys):
    """``NAME=KEY VALUE ...`` -> (family name, [(key, value), ...]); bad input is a parser error."""
    name, sep, text = item.partition("=")
    words = text.split()
    if not sep or not name.isidentifier() or not words or len(words) % 2:
        parser.error(f"--distill takes NAME=\"KEY VALUE ...\" (NAME letters, digits, _; KEY a "
                     f"MODEL.SLIM.DISTILL key without the prefix); got {item!r}.")
    keys = []
    for key, value in zip(words[::2], words[1::2]):
        if key not in distill_keys:
            parser.error(f"--distill {name}: unknown MODEL.SLIM.DISTILL key {key!r}; allowed: "
                         f"{sorted(distill_keys)}.")
        kind = type(distill_keys[key])  # "0" for a float key reaches yacs as 0.0, not 0
        try:
            keys.append((key, repr(kind(value))))
        except ValueError:
            parser.error(f"--distill {name}: MODEL.SLIM.DISTILL.{key} takes a {kind.__name__}; "
                         f"got {value!r}.")
    return "universal_distill_" + name, keys


DEFAULT_FAMILIES = ["switchable", "universal", "universal_distill"] + [
    f"universal_distill_{term}" for term in TERMS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fidelity.add_run_arguments(p, "0 1", "a tiny model, 3 iterations, 1 seed, widths 1.0 and 0.5 "
                               "(between: 0.75), two families, tiny data (tests)")
    p.add_argument("--between", type=float, nargs="*",
                   help="widths no family trains at exactly, also evaluated (default: 0.85 0.6 "
                   "0.4; --tiny: 0.75)")
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES),
                   help=f"default: {' '.join(DEFAULT_FAMILIES)} (none with --distill)")
    p.add_argument("--distill", action="append", default=[], metavar='NAME="KEY VALUE ..."',
                   help="one more family, universal_distill_NAME: distillation with these "
                   "MODEL.SLIM.DISTILL keys (repeatable; after the other families)")
    args = p.parse_args(argv)
    distill_keys = dict(load_slim_cfg(args.config_file).MODEL.SLIM.DISTILL)
    del distill_keys["ENABLED"]
    args.variants = dict(parse_variant(p, item, distill_keys) for item in args.distill)
    if len(args.variants) != len(args.distill):
        p.error(f"--distill names must be distinct; got {args.distill}.")
    taken = set(args.variants) & set(FAMILIES)
    if taken:
        p.error(f"--distill names {sorted(taken)} are built-in families: run them with "
                f"--families, or choose another NAME.")
    fidelity.check_opts(p, args, ("MODEL.SLIM.MODE", "MODEL.SLIM.WIDTH_RANGE",
                                  "MODEL.SLIM.DISTILL.ENABLED"),
                        "--output-dir, --seeds, --iters, --widths, --families")
    fidelity.check_jobs(p, args)
    if args.tiny:
        args.widths = args.widths or [1.0, 0.5]
        args.between = [0.75] if args.between is None else args.between
        args.iters = args.iters or 3
        args.families = args.families or ["switchable", "universal_distill_cls"]
        args.opts = fidelity._tiny_opts() + list(args.opts)
    if args.families is None:
        args.families = [] if args.variants else DEFAULT_FAMILIES
    args.families = list(args.families) + list(args.variants)
    args.between = [0.85, 0.6, 0.4] if args.between is None else args.between
    args.seeds = args.seeds or ([0] if args.tiny else [0, 1])
    args.individual_weights = {}  # fidelity's runner asks; no individual family here
    if args.device:
        args.opts += ["MODEL.DEVICE", args.device]
    return args


def _spectrum_command(run, widths):
    weights = os.path.join(run["folder"], "model_final.pth")
    return run["command"] + ["MODEL.WEIGHTS", weights, "MODEL.SLIM.TEST_WIDTHS",
                             fidelity._widths_opt(widths),
                             "OUTPUT_DIR", os.path.join(run["folder"], SPECTRUM)]


def evaluate_spectrum(run, widths, dataset, num_gpus):
    """Evaluate ``run``'s final model at ``widths`` (``--eval-only``); reuse a finished evaluation.

    Returns:
        list[dict]: the rows of its width table.
    """
    folder = os.path.join(run["folder"], SPECTRUM)
    command = _spectrum_command(run, widths)
    record_path = os.path.join(folder, SPECTRUM_FILE)
    table_path = os.path.join(folder, dataset, "width_table.json")
    done = os.path.isfile(record_path) and os.path.isfile(table_path)
    if done:
        with open(record_path) as f:
            done = json.load(f)["command"] == command
    if not done:
        fidelity.run_train_net(["--eval-only", "--num-gpus", str(num_gpus)] + command, folder)
        with open(record_path, "w") as f:
            json.dump({"command": command}, f, indent=2)
    with open(table_path) as f:
        rows = json.load(f)["rows"]
    found = sorted(r["width"] for r in rows)
    if any(min(abs(w - r) for r in found) > 1e-9 for w in widths):
        raise SystemExit(f"{table_path} has widths {found}, not all of {widths}.")
    return rows


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts)
    args.widths = sorted(set(args.widths or cfg.MODEL.SLIM.WIDTHS), reverse=True)
    if args.widths[0] != 1.0:
        raise SystemExit(f"--widths must include 1.0 (the switchable model's widest); got "
                         f"{args.widths}.")
    outside = [w for w in args.between if not min(args.widths) < w < 1.0 or w in args.widths]
    if outside:
        raise SystemExit(f"--between widths must lie strictly between {min(args.widths):g} and "
                         f"1 and not be one of --widths {args.widths}; got {outside}.")
    evaluated = sorted(set(args.widths) | set(args.between), reverse=True)
    dataset = fidelity.eval_dataset(cfg, args.small_val)
    args.output_dir = os.path.abspath(args.output_dir)
    saved = dict(fidelity.FAMILIES)
    fidelity.FAMILIES.update(FAMILIES)  # plan_runs looks families up there
    fidelity.FAMILIES.update({name: _variant(name, keys)
                              for name, keys in args.variants.items()})
    try:
        runs = fidelity.plan_runs(args, cfg, dataset)
    finally:
        fidelity.FAMILIES.clear()
        fidelity.FAMILIES.update(saved)

    def train_and_evaluate(i, run):
        what = f"[{i}/{len(runs)}] {run['family']} seed {run['seed']}"
        record = fidelity._finished(run, dataset)
        if record is None:
            print(f"{what}: training -> {run['folder']}", flush=True)
            record = fidelity.train(run, args.num_gpus)
        else:
            print(f"{what}: reused {run['folder']}", flush=True)
        print(f"{what}: evaluating at {evaluated}", flush=True)
        rows = evaluate_spectrum(run, evaluated, dataset, args.num_gpus)
        # A run made by fidelity.py records its own family name ("slimmable" for "switchable").
        return (dict(record, family=run["family"]),
                [dict(row, family=run["family"], seed=run["seed"]) for row in rows])

    results = fidelity.run_all(runs, train_and_evaluate, args.jobs)
    done = [record for record, _ in results]
    records = [row for _, rows in results for row in rows]

    rows = table.aggregate(records, args.families, baseline="switchable")
    times = table.time_summary(done, args.families)
    md = (f"Evaluated on {dataset}; {len(args.seeds)} seed(s) {args.seeds}; "
          f"{args.iters or cfg.SOLVER.MAX_ITER} iterations per run; config {args.config_file}; "
          f"trained widths of the switchable model {args.widths}, widths between them "
          f"{sorted(args.between, reverse=True)}.\n\n"
          + table.markdown_table(rows, args.families, baseline="switchable") + "\n\n"
          + table.markdown_times(times) + "\n")
    runs = [{k: r.get(k) for k in ("family", "seed", "folder", "train_s", "s_per_iter")}
            for r in done]
    return fidelity.write_result("universal", args, cfg, dataset, rows, times, md,
                                 {"between": args.between, "runs": runs})


if __name__ == "__main__":
    main()
