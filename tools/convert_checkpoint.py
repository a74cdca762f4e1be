#!/usr/bin/env python
"""Convert an ImageNet checkpoint into slim_det initial weights for MODEL.WEIGHTS.

Examples::

    # the S-Nets authors' slimmable models (widths default to the released lists)
    python tools/convert_checkpoint.py s_mobilenet_v2_0.35_0.5_0.75_1.0.pt \\
        output/s_mobilenet_v2_d2.pth --config-file configs/slim_mobilenet_v2_faster_rcnn.yaml
    python tools/convert_checkpoint.py s_resnet50_0.25_0.5_0.75_1.0.pt output/s_resnet50_d2.pth
    # torchvision ImageNet weights (one norm, copied to every width when loading)
    python tools/convert_checkpoint.py resnet50-0676ba61.pth output/tv_resnet50_d2.pth

It prints what it mapped and the config lines the weights need, and refuses (exit status 2) a file
it does not recognize or a width list that does not fit the checkpoint or the config.
"""
import argparse
import sys

from detectron2.config import get_cfg

import slim_det
from slim_det.checkpoint_convert import FORMATS, CheckpointFormatError, convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="the ImageNet checkpoint (.pt / .pth)")
    parser.add_argument("output", help="where to write the slim_det weights (.pth)")
    parser.add_argument("--format", default="auto", choices=["auto"] + list(FORMATS),
                        help="the source format (default: detected from the key names)")
    parser.add_argument("--widths", type=float, nargs="+", default=None,
                        help="widths the authors' checkpoint was trained for (its bn.0, bn.1, ...)")
    parser.add_argument("--config-file", default=None,
                        help="a slim_det config to check the weights against (widths, backbone)")
    parser.add_argument("--divisor", type=int, default=None,
                        help="MODEL.SLIM.DIVISOR (default: the config's, else 8)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a trusted file holding pickled objects besides tensors")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    cfg = None
    if args.config_file:
        cfg = slim_det.add_slim_config(get_cfg())
        cfg.merge_from_file(args.config_file)
    try:
        convert_checkpoint(
            args.source,
            args.output,
            fmt=None if args.format == "auto" else args.format,
            widths=args.widths,
            cfg=cfg,
            divisor=args.divisor,
            trust_pickle=args.trust_pickle,
        )
    except CheckpointFormatError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
