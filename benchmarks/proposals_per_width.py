#!/usr/bin/env python
"""What fewer RPN proposals at narrow widths cost in AP and gain in speed, over trained seeds.

    python benchmarks/proposals_per_width.py --runs output/arch/faster/slimmable/seed{0,1,2} \
        --dataset shapes_val_large --output-dir output/proposals \
        --variant "100=" --variant "50/25=[[0.5, 50], [0.25, 25]]" [KEY VALUE ...]

Each ``--runs`` folder is a trained slim model (``config.yaml`` and ``model_final.pth``, as
tools/train_net.py leaves them). Each ``--variant`` is ``NAME=TABLE``, TABLE a value of
MODEL.SLIM.RPN_POST_NMS_TOPK_TEST (empty: the config's own POST_NMS_TOPK_TEST everywhere). Every
run is evaluated at every width under every variant with ``tools/train_net.py --eval-only`` (run
one at a time: the latency is the evaluation's median model time per batch); an evaluation
already in ``--output-dir`` is reused. Output: per width and metric, each variant's mean ± std and
min over the runs and its difference from the first variant, the same for latency, as JSON (last
line, and ``--output-dir/proposals_per_width.json``) and markdown (``.md``).
"""
import argparse
import json
import os
import statistics
import sys

import _fidelity_table as table
from fidelity import run_train_net


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="trained model folders (one per seed)")
    p.add_argument("--variant", action="append", required=True, dest="variants",
                   help="NAME=TABLE (repeat it); the first is the baseline")
    p.add_argument("--dataset", required=True, help="registered dataset to evaluate on")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the evaluations")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    args = p.parse_args(argv)
    variants = []
    for item in args.variants:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--variant takes NAME=TABLE; got {item!r}.")
        variants.append((name, value.strip() or "[]"))
    if len({n for n, _ in variants}) != len(variants):
        p.error("--variant names must be distinct.")
    for run in args.runs:
        for name in ("config.yaml", "model_final.pth"):
            if not os.path.isfile(os.path.join(run, name)):
                p.error(f"--runs folder {run!r} has no {name} (a tools/train_net.py output).")
    args.variants = variants
    return args


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "variant"


def evaluate(args, run, index, name, value):
    """The width table of ``run`` evaluated under one variant (reused when already there)."""
    folder = os.path.join(args.output_dir, _slug(name), f"run{index}")
    path = os.path.join(folder, args.dataset, "width_table.json")
    if not os.path.isfile(path):
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        run_train_net([
            "--eval-only", "--config-file", os.path.join(run, "config.yaml"),
            "MODEL.WEIGHTS", os.path.join(run, "model_final.pth"),
            "MODEL.PROPOSAL_GENERATOR.NAME", "SlimRPN",
            "MODEL.SLIM.RPN_POST_NMS_TOPK_TEST", value,
            "DATASETS.TEST", f"('{args.dataset}',)", "OUTPUT_DIR", folder,
        ] + list(args.opts), folder)
    with open(path) as f:
        return json.load(f)["rows"]


def latency_rows(records, names):
    """Per width, each variant's latency summary and its ratio to the first variant's mean."""
    rows = []
    for width in sorted({r["width"] for r in records}, reverse=True):
        row = {"width": width}
        for name in names:
            row[name] = table.summarize(
                [r["latency_ms"] for r in records if r["width"] == width and r["family"] == name])
        base = row[names[0]]["mean"]
        row["ratio"] = {n: row[n]["mean"] / base for n in names[1:]}
        rows.append(row)
    return rows


def markdown_latency(rows, names):
    header = ["width"] + [f"{n} (ms)" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['width']:g}"] + [table._cell(row[n]) for n in names]
        cells += [f"{row['ratio'][n]:.2f}" for n in names[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    records = []
    for index, run in enumerate(args.runs):
        for name, value in args.variants:
            rows = evaluate(args, run, index, name, value)
            records += [dict(row, family=name, seed=index, run=run) for row in rows]
    names = [n for n, _ in args.variants]
    rows = table.aggregate(records, names, baseline=names[0])
    latency = latency_rows(records, names)
    text = "\n\n".join([table.markdown_table(rows, names, baseline=names[0]),
                        markdown_latency(latency, names)])
    result = {"benchmark": "proposals_per_width", "dataset": args.dataset, "runs": args.runs,
              "variants": dict(args.variants), "command": " ".join(sys.argv),
              "rows": rows, "latency": latency, "records": records}
    base = os.path.join(args.output_dir, "proposals_per_width")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
