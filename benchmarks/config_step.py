#!/usr/bin/env python
"""The training-step time of a config under option variants, interleaved in one process.

    python benchmarks/config_step.py --variants "" "MODEL.FPN.OUT_CHANNELS 192" \
        "MODEL.FPN.OUT_CHANNELS 256" [--config-file configs/shapes/slim_mask_rcnn_shapes.yaml]

Each variant is a string of config KEY VALUE pairs over ``--config-file`` ("" is the config as
is). Every variant gets its own `tools/train_net.py` Trainer (its model, optimizer and data);
the steps then run in turn, variant after variant, ``--warmup`` untimed rounds and ``--repeats``
timed ones, so a machine that slows down mid-run slows every variant alike. Reported: the median
seconds of one whole training step (`Trainer.run_step`: every width's forward and backward and
the optimizer step) and its ratio to the first variant. Read the ratios on a busy machine.
The steps start from the config's MODEL.WEIGHTS: a freshly initialized model's first steps cost
less than a trained model's (pass "MODEL.WEIGHTS <model_final.pth>" in a variant to time those).
"""
import argparse
import os
import shlex
import statistics
import sys

import _common
import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from slim_det.config import load_slim_cfg

sys.path.insert(0, os.path.join(_common.REPO, "tools"))
from train_net import Trainer  # noqa: E402

DEFAULT_CONFIG = os.path.join(_common.REPO, "configs", "shapes", "slim_mask_rcnn_shapes.yaml")
TINY_CONFIG = os.path.join(_common.REPO, "configs", "tests", "tiny.yaml")


def build_trainer(args, variant, output_dir):
    # The config as tools/train_net.py merges it (file, then options), tiny.yaml in between for
    # --tiny; seeded like default_setup, without its per-run logging set-up.
    cfg = load_slim_cfg(args.config_file)
    if args.tiny:
        cfg.merge_from_file(TINY_CONFIG)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("shapes_tiny_train",), ("shapes_tiny_val",)
    cfg.merge_from_list(["OUTPUT_DIR", output_dir, "SEED", args.seed] + shlex.split(variant))
    if args.device:
        cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--variants", nargs="+", default=[""],
                   help="option strings, each 'KEY VALUE ...' ('' = the config as is)")
    p.add_argument("--seed", type=int, default=0, help="SEED of every variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--repeats", type=int, default=6, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", help="MODEL.DEVICE of every variant (default: the config's)")
    p.add_argument("--tiny", action="store_true",
                   help="configs/tests/tiny.yaml on the 16-image shapes_tiny_train (tests)")
    p.add_argument("--output-dir", default=os.path.join("output", "config_step"))
    p.add_argument("--json-out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.tiny:  # checks that it works, not how fast (see _common.parse)
        torch.backends.mkldnn.enabled = False
        args.warmup, args.repeats, args.threads = 0, 1, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    trainers = [build_trainer(args, v, os.path.join(args.output_dir, f"v{i}"))
                for i, v in enumerate(args.variants)]
    times = [[] for _ in trainers]
    with EventStorage(0) as storage:
        for step in range(args.warmup + args.repeats):
            for trainer, spent in zip(trainers, times):
                trainer.storage, trainer.iter = storage, step
                start = _common.now()
                trainer.run_step()
                if step >= args.warmup:
                    spent.append(_common.now() - start)
    medians = [statistics.median(t) for t in times]
    rows = [{"variant": v or "(config as is)", "step_s": m, "ratio": m / medians[0],
             "steps_s": t} for v, m, t in zip(args.variants, medians, times)]
    env = {"device": trainers[0].cfg.MODEL.DEVICE, "threads": torch.get_num_threads(), "torch": torch.__version__, "tiny": args.tiny,
           "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
           "config_file": os.path.relpath(args.config_file, _common.REPO),
           "load_average_1m": os.getloadavg()[0]}
    columns = [("variant", "variant", "{}"), ("step_s", "step (s)", "{:.3f}"),
               ("ratio", "ratio", "{:.2f}")]
    table = _common.format_table(rows, columns)
    _common.emit({"benchmark": "config_step", "environment": env, "rows": rows}, table,
                 args.json_out)


if __name__ == "__main__":
    main()
