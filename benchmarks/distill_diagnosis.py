#!/usr/bin/env python
"""What each inplace-distillation term does to the shared weights, over training.

    python benchmarks/distill_diagnosis.py \\
        --config-file configs/shapes/slim_universal_mask_rcnn_shapes.yaml \\
        --iters 300 --every 25 --widths 1,0.75,0.5,0.25 [--json-out F] [KEY VALUE ...]

Trains the config with MODEL.SLIM.DISTILL.ENABLED True (SlimTrainer, as tools/train_net.py) and,
before every ``--every``-th step, probes one separate training batch at the current weights: a
training forward at each of ``--widths``, widest (the teacher) first, and for every loss term of
every width the gradient it alone puts on the shared parameters (``torch.autograd.grad``; nothing
is applied). Reported per probe, width and term: the loss value, its gradient norm, the cosine
with the sum of that width's own ground-truth gradients, and the cosine with the teacher's
ground-truth gradient. A distillation term several times stronger than the ground-truth losses it
mirrors, or pointing against the teacher's gradient, shows up here. The probes draw random numbers
(proposal sampling), so the training run is not bit for bit the one without probes.
"""
import argparse
import json
import os
import statistics
import sys

import torch
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import slim_det  # noqa: E402,F401
from slim_det.config import load_slim_cfg  # noqa: E402
from slim_det.engine import SlimTrainer  # noqa: E402
from slim_det.width import set_width  # noqa: E402

DISTILL_TERMS = ("distill_rpn", "distill_cls", "distill_box")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--iters", type=int, default=300, help="training iterations")
    p.add_argument("--every", type=int, default=25, help="probe every this many iterations")
    p.add_argument("--widths", type=lambda text: [float(w) for w in text.split(",")],
                   default=[1.0, 0.75, 0.5, 0.25],
                   help="comma-separated widths probed; the widest must be the teacher")
    p.add_argument("--json-out", default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p.parse_args(argv)


def _cosine(a, b):
    a, b = a.double(), b.double()  # float32 sums over millions of entries drift past 1
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def probe(model, batch, widths):
    """Per width and loss term: value, gradient norm and cosines (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    rows, teacher_gt = {}, None
    try:
        for width in sorted(widths, reverse=True):
            set_width(model, width)
            with EventStorage():
                losses = model(batch)
            grads = {}
            for name, loss in losses.items():
                parts = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                         for g, p in zip(parts, params)])
            gt = sum(g for n, g in grads.items() if n not in DISTILL_TERMS)
            if teacher_gt is None:
                teacher_gt = gt
            rows[f"{width:g}"] = {name: {"loss": float(losses[name]), "grad_norm": float(g.norm()),
                                         "cos_own_gt": _cosine(g, gt),
                                         "cos_teacher_gt": _cosine(g, teacher_gt)}
                                  for name, g in grads.items()}
            rows[f"{width:g}"]["ground_truth_total"] = {
                "loss": sum(float(v) for n, v in losses.items() if n not in DISTILL_TERMS),
                "grad_norm": float(gt.norm()), "cos_own_gt": 1.0,
                "cos_teacher_gt": _cosine(gt, teacher_gt)}
            del grads, losses
    finally:
        set_width(model, 1.0)
        model.train(was_training)
    return rows


class _Probe(HookBase):
    def __init__(self, cfg, widths, every, records):
        self.widths, self.every, self.records = widths, every, records
        self.batches = iter(SlimTrainer.build_train_loader(cfg))

    def before_step(self):
        iteration = self.trainer.iter
        if iteration % self.every:
            return
        rows = probe(self.trainer.model, next(self.batches), self.widths)
        self.records.append({"iter": iteration, "widths": rows})
        print(json.dumps(self.records[-1]), flush=True)


def summary_table(records):
    """Mean over probes of gradient norm and cosines, per width and term."""
    lines = ["| width | term | loss | grad norm | cos(own GT) | cos(teacher GT) |",
             "|---|---|---|---|---|---|"]
    first = records[0]["widths"]
    for width, terms in first.items():
        for term in terms:
            def mean(key):
                values = [r["widths"][width][term][key] for r in records
                          if term in r["widths"].get(width, {})]
                values = [v for v in values if v == v]  # no NaN
                return statistics.mean(values) if values else float("nan")
            lines.append(f"| {width} | {term} | {mean('loss'):.3f} | {mean('grad_norm'):.3f} | "
                         f"{mean('cos_own_gt'):.2f} | {mean('cos_teacher_gt'):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts + [
        "MODEL.SLIM.DISTILL.ENABLED", "True", "SOLVER.MAX_ITER", str(args.iters),
        "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100000"])
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS, as tools/train_net.py (none: scratch)
    records = []
    trainer.register_hooks([_Probe(cfg, args.widths, args.every, records)])
    trainer.train()
    result = {"config_file": args.config_file, "opts": args.opts, "widths": args.widths,
              "probes": records}
    table = summary_table(records)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(table)
    return result


if __name__ == "__main__":
    main()
