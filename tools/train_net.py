#!/usr/bin/env python
"""Train a slimmable detector once (all widths every iteration) and evaluate it at every width.

Shaped like detectron2's tools/train_net.py:

    python tools/train_net.py --config-file configs/slim_mask_rcnn.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/slim_mask_rcnn.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth

``--eval-only`` refuses a checkpoint that leaves any model tensor unloaded (another depth, other
widths, another number of classes, weights without the heads; see slim_det/weights.py) unless
MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS is True; training loads what fits and logs what it loaded. Bad
inputs (a config file that does not parse, such a checkpoint) end with one message, exit status 2.
"""
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import slim_det  # noqa: F401  (registers slim_det's backbones, heads and datasets)
from slim_det.calibration import report_loaded_norms
from slim_det.config import load_slim_cfg
from slim_det.engine import SlimTrainer
from slim_det.inputs import exit_on_input_error
from slim_det.logger import setup_slim_logger
from slim_det.weights import load_weights


class Trainer(SlimTrainer):
    """slim_det's trainer; subclass it here to customise data loading or hooks."""


def setup(args):
    """The config from detectron2's defaults, slim_det's keys, the file and the opts."""
    cfg = load_slim_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only; slim_det's tables and
    # per-width headers must reach the terminal and log.txt too.
    setup_slim_logger(cfg.OUTPUT_DIR)
    return cfg


def main(args):
    with exit_on_input_error("train_net.py"):
        return _run(args)


def _run(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # An individual model (MODEL.SLIM.INDIVIDUAL_WIDTH) also takes full-width weights, sliced.
        # Every model tensor must load: evaluating random weights prints meaningless numbers.
        load_weights(cfg, model, resume=args.resume, save_dir=cfg.OUTPUT_DIR)
        report_loaded_norms(model)  # widths without statistics are calibrated by test()
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
