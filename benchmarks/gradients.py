#!/usr/bin/env python
"""Where slimmable training blows up: each width's gradient and each module's, every iteration.

    python benchmarks/gradients.py --seed 11 --iters 75 \\
        SOLVER.BASE_LR 0.01 SOLVER.WARMUP_ITERS 30 MODEL.SLIM.LOSS_REDUCTION sum \\
        SOLVER.CLIP_GRADIENTS.ENABLED False          # the recipe of issue 8, before the fix

Trains ``--config-file`` (default: the demo) for ``--iters`` iterations with SlimTrainer, exactly as
tools/train_net.py would with ``SEED -1`` after ``seed_all_rng(--seed)``, and records per
iteration: each width's losses, the norm of that width's own gradient (the accumulated gradients
after its backward minus before, unscaled by LOSS_REDUCTION), the global norm before clipping,
and the norm of each top-level module's gradient (``roi_heads.box_head``, ``backbone.bottom_up``,
...).
Prints a table every ``--every`` iterations and one JSON line (``--json-out``: also to a file).
"""
import argparse
import json
import os
import sys

import _common
import torch
from detectron2.utils.env import seed_all_rng

import slim_det  # noqa: F401  (registers the shapes datasets)
from slim_det.config import load_slim_cfg
from slim_det.engine import SlimTrainer

DEMO = os.path.join(_common.REPO, "configs", "shapes", "slim_mask_rcnn_shapes.yaml")
TINY = os.path.join(_common.REPO, "configs", "tests", "tiny.yaml")


class GradientRecorder:
    """Called after each width's backward; stores what that width added to the gradients."""

    def __init__(self, model):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.rows = []
        self._previous = None
        self._row = None

    def _flat(self):
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for _, p in self.params
        ])

    def __call__(self, width, losses):
        if self._row is None:
            self._row = {"widths": {}}
            self._previous = torch.zeros(sum(p.numel() for _, p in self.params))
        flat = self._flat()
        own = float((flat - self._previous).norm())
        self._previous = flat
        self._row["widths"][f"{width:g}"] = {"grad_norm": own,
                                             **{k: float(v) for k, v in losses.items()}}

    def finish_iteration(self, iteration, lr):
        """Close the iteration's row (before clipping and the optimizer step)."""
        modules = {}
        for name, p in self.params:
            if p.grad is not None:
                key = ".".join(name.split(".")[:2])
                modules[key] = modules.get(key, 0.0) + float(p.grad.pow(2).sum())
        self._row.update(iteration=iteration, lr=lr,
                         global_norm=sum(modules.values()) ** 0.5,
                         modules={k: v ** 0.5 for k, v in modules.items()})
        self.rows.append(self._row)
        self._row = None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEMO)
    p.add_argument("--seed", type=int, default=0, help="seed_all_rng seed (the config's SEED -1)")
    p.add_argument("--iters", type=int, default=75)
    p.add_argument("--every", type=int, default=5, help="print every N-th iteration")
    p.add_argument("--output-dir", default="output/gradients")
    p.add_argument("--tiny", action="store_true", help="tiny model and data, 3 iterations (tests)")
    p.add_argument("--device", help="MODEL.DEVICE (default: the config's, cpu without CUDA)")
    p.add_argument("--json-out")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = p.parse_args(argv)
    opts = ["SOLVER.MAX_ITER", str(args.iters), "OUTPUT_DIR", args.output_dir, "SEED", "-1",
            "DATASETS.TEST", "()"]
    opts += (["MODEL.DEVICE", args.device] if args.device else []) + args.opts
    cfg = load_slim_cfg(args.config_file, opts)
    if args.tiny:
        cfg.merge_from_file(TINY)
        cfg.merge_from_list(["DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "()",
                             "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", args.output_dir])
        torch.set_num_threads(1)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_all_rng(args.seed)

    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)
    recorder = GradientRecorder(trainer.model)
    trainer._trainer.after_width = recorder
    step = trainer._trainer.run_step

    def recorded_step():
        # The row closes once every width is done, before clipping: in the after_backward hook.
        original = trainer._trainer.after_backward
        trainer._trainer.after_backward = lambda: (
            recorder.finish_iteration(trainer._trainer.iter,
                                      trainer.optimizer.param_groups[0]["lr"]),
            original(),
        )
        try:
            step()
        finally:
            trainer._trainer.after_backward = original

    trainer._trainer.run_step = recorded_step
    error = None
    try:
        trainer.train()
    except FloatingPointError as e:  # a diverged run is a result here, not a crash
        error = str(e)
    widths = list(recorder.rows[0]["widths"]) if recorder.rows else []
    table_rows = []
    for row in recorder.rows[:: args.every]:
        line = {"iteration": row["iteration"], "lr": row["lr"], "global": row["global_norm"]}
        for w in widths:
            line[f"g{w}"] = row["widths"][w]["grad_norm"]
            line[f"cls{w}"] = row["widths"][w].get("loss_cls")
        table_rows.append(line)
    columns = [("iteration", "iter", "{}"), ("lr", "lr", "{:.4f}"), ("global", "|g|", "{:.1f}")]
    columns += [(f"g{w}", f"|g_{w}|", "{:.1f}") for w in widths]
    columns += [(f"cls{w}", f"cls_{w}", "{:.2f}") for w in widths]
    result = {"benchmark": "gradients", "config": args.config_file, "seed": args.seed,
              "opts": args.opts, "error": error, "environment": {"tiny": args.tiny},
              "rows": recorder.rows}
    _common.emit(result, _common.format_table(table_rows, columns), args.json_out)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
