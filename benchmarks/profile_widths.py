#!/usr/bin/env python
"""Where each width's inference time goes: latency, its parts, GFLOP/s and the top ops.

    python benchmarks/profile_widths.py [--models shapes r50] [--size N] [--threads 2] \
        [--shapes-weights output/shapes_mask_rcnn/model_final.pth] [--dataset shapes_val] \
        [--exported] [--no-ops] [--no-flops] [--without-speedups] [--device cpu]

Models: "shapes", the shapes demo detector (configs/shapes/slim_mask_rcnn_shapes.yaml, R-18-FPN)
at 128 and 512 px; "r50", the R-50-FPN Mask R-CNN of each of ``--scopes``
(configs/slim_mask_rcnn_all.yaml for "all") at 512 and 800 px. ``--size N`` runs every model at N
px only. Without ``--device`` it runs on the CPU and then on CUDA when there is a GPU. Weights are
random (and
BN statistics set from random images, as every benchmark does) unless ``--shapes-weights`` /
``--r50-weights`` name a checkpoint; the JSON says which. ROI_HEADS.SCORE_THRESH_TEST is 0 unless
``--score-thresh`` says otherwise, so that a random model, too, runs the mask head on all
TEST.DETECTIONS_PER_IMAGE detections. Inputs are random pixels, or with ``--dataset NAME`` the
images of that registered dataset (shorter side resized to the size), a batch per run in turn.

Per width: median latency; the mean time of each part (preprocess, backbone = bottom-up network,
FPN, RPN with its NMS, ROI heads with ROIAlign, post-processing, other = what no part covers)
from forward hooks (`_breakdown.PartTimer`), with finer parts inside the RPN and ROI heads;
GFLOPs (fvcore) and GFLOP/s of the detector and of backbone + FPN; the speed-up over width 1; one
extra run under torch.profiler for the op-level view (``--no-ops`` skips it); with
``--exported``, the exported plain model of each width timed in alternation with the slim one.
``--without-speedups`` profiles the "before": slim_det's exact inference speed-ups undone
(`without_speedups_`), so one commit gives both sides of the comparison.

Table columns: ms (median latency), speed-up and GFLOP/s (detector), then mean milliseconds of
bb (bottom-up network), fpn, rpn, roi (ROI heads), roialign (the box and mask poolers, inside
roi), nms (torchvision::nms self time, RPN and box NMS), post and other; slow conv / mkldnn conv
/ copy_: calls per image of aten::_slow_conv2d_forward, aten::mkldnn_convolution and aten::copy_;
plain ms: the exported plain model (``--exported``). The JSON has every part, the finer parts,
the top ops, and GFLOP/s of backbone + FPN.
"""
import statistics

import _breakdown
import _common
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

import slim_det
from slim_det import layers as slim_layers
from slim_det.export import export_width
from slim_det.roi_align import ParallelROIAlign
from slim_det.weights import load_weights

SHAPES_CONFIG = f"{_common.REPO}/configs/shapes/slim_mask_rcnn_shapes.yaml"
DEFAULT_SIZES = {"shapes": (128, 512), "r50": (512, 800)}
# The shapes detector in --tiny runs: fewer proposals and detections (the R-50 uses TINY_OPTS).
SHAPES_TINY_OPTS = ["MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 10]


def build(args, name, scope=None):
    """(cfg, model, weights) of model ``name`` (R-50: of ``scope``) in eval mode; weights: a path
    or "random"."""
    weights = getattr(args, f"{name}_weights") or ""
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(SHAPES_CONFIG if name == "shapes" else _common.CONFIGS[scope])
    opts = ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", args.device,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", args.score_thresh]
    if not weights:  # a trained model keeps its widths (its checkpoint has their norms)
        opts += ["MODEL.SLIM.WIDTHS", sorted(set(args.widths) | {1.0})]
    if args.tiny:
        opts += SHAPES_TINY_OPTS if name == "shapes" else _common.TINY_OPTS
    cfg.merge_from_list(opts + list(args.opts))
    cfg.freeze()
    model = build_model(cfg)
    if weights:
        load_weights(cfg, model)
    else:
        _common.calibrate_bn(model, args.widths, min(args.sizes_of(name)), args.device)
    return cfg, model.eval(), weights or "random"


SPEEDUPS = ("roi_align", "weight_slices")


def without_speedups_(model, which=SPEEDUPS):
    """Undo slim_det's exact inference speed-ups ``which`` in ``model`` (the "before" of the
    profile): "roi_align", detectron2's single-threaded ROIAlign for every `ParallelROIAlign`;
    "weight_slices", convolutions that slice their weight on every call and pass the slice to the
    kernel as it is, instead of a cached contiguous copy. Outputs stay the same (each is bit for
    bit); only time changes."""
    if "roi_align" in which:
        for module in model.modules():
            if isinstance(module, ParallelROIAlign):
                module.__class__ = ROIAlign
    if "weight_slices" in which:  # a benchmark-only patch of the function every slim conv calls
        slim_layers._inference_weight = lambda layer, rows, cols: layer.weight[:rows, :cols]
    return model


def input_batches(args, size, fmt):
    """Batches of detectron2 inputs at ``size`` px: random pixels, or ``--dataset`` images."""
    if not args.dataset:
        return [_common.random_images(args.batch, size)]
    resize = T.ResizeShortestEdge(size, max_size=size * 2)
    records = DatasetCatalog.get(args.dataset)[: args.batch * max(1, args.repeats)]
    images = []
    for record in records:
        image = read_image(record["file_name"], fmt)
        image = resize.get_transform(image).apply_image(image)
        images.append({"image": torch.as_tensor(image.transpose(2, 0, 1).copy()).float()})
    return [images[i:i + args.batch] for i in range(0, len(images), args.batch)]


def gflops_of(model, inputs, skip):
    """GFLOPs of one call on ``inputs``: {"gflops": detector, "backbone_fpn_gflops",
    "bottom_up_gflops"}, from one fvcore trace (None each with ``skip``)."""
    keys = {"gflops": "model", "backbone_fpn_gflops": "model.backbone",
            "bottom_up_gflops": "model.backbone.bottom_up"}
    if skip:
        return dict.fromkeys(keys)
    counter = FlopCountAnalysis(model, inputs)  # detectron2's: names modules "model.<name>"
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = counter.by_module()
    return {key: by_module[name] / 1e9 if name in by_module else None
            for key, name in keys.items()}


def profile_width(args, model, plain, batches):
    """Timed runs of the slim model (and the plain one, in alternation): latencies and parts."""
    timer = _breakdown.PartTimer(model, args.device)
    # The plain model carries the same part hooks, so that both pay their (small) cost alike.
    plain_timer = None if plain is None else _breakdown.PartTimer(plain, args.device)
    runs, plain_ms = [], []
    for run in range(args.warmup + args.repeats):
        inputs = batches[run % len(batches)]
        parts = timer.run(inputs)
        if plain_timer is not None:
            plain_parts = plain_timer.run(inputs)
            if run >= args.warmup:
                plain_ms.append(plain_parts["total"])
        if run >= args.warmup:
            runs.append(parts)
    mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
    return {
        "latency_ms": statistics.median(r["total"] for r in runs),
        "mean_ms": mean.pop("total"),
        "parts_ms": {k: mean[k] for k in _breakdown.PARTS},
        "details_ms": {k: mean[k] for k in _breakdown.DETAILS},
        "plain_ms": statistics.median(plain_ms) if plain_ms else None,
    }


def add_ratios(rows):
    """Speed-up, GFLOPs ratio and GFLOP/s relative to width 1 of the same model and size."""
    full = next((r for r in rows if r["width"] == 1.0), None)
    for row in rows:
        row["gflops_per_s"] = _rate(row["gflops"], row["latency_ms"])
        bb_ms = row["parts_ms"]["backbone"] + row["parts_ms"]["fpn"]
        row["backbone_fpn_gflops_per_s"] = _rate(row["backbone_fpn_gflops"], bb_ms)
        if row["plain_ms"] is not None:
            row["slim_over_plain"] = row["latency_ms"] / row["plain_ms"]
        if full is None:
            continue
        row["speedup"] = full["latency_ms"] / row["latency_ms"]
        if row["gflops"]:
            row["gflops_ratio"] = full["gflops"] / row["gflops"]
            row["gflops_per_s_vs_w1"] = row["gflops_per_s"] / full["gflops_per_s"]


def _rate(gflops, ms):
    return None if gflops is None or ms <= 0 else gflops / (ms / 1000.0)


def profile_model(args, name, scope=None):
    """The rows of model ``name`` (R-50: of ``scope``): one per size and width."""
    cfg, model, weights = build(args, name, scope)
    if args.without_speedups:
        without_speedups_(model, args.without_speedups)
    rows = []
    for size in args.sizes_of(name):
        batches = input_batches(args, size, cfg.INPUT.FORMAT)
        group = []
        for width in sorted(args.widths, reverse=True):
            plain = export_width(model, cfg, width)[1].eval() if args.exported else None
            if args.without_speedups and plain is not None:
                without_speedups_(plain, args.without_speedups)
            with slim_det.using_width(model, width):
                row = {"model": name, "scope": cfg.MODEL.SLIM.SCOPE, "device": args.device,
                       "weights": weights, "size": size, "width": width,
                       "without_speedups": args.without_speedups}
                row.update(gflops_of(model, batches[0], args.no_flops))
                row.update(profile_width(args, model, plain, batches))
                row["ops"] = None if args.no_ops else _breakdown.op_profile(
                    model, batches[0], args.device)
            group.append(row)
            del plain
        add_ratios(group)
        rows += group
    return rows


COLUMNS = [
    ("model", "model", "{}"), ("size", "px", "{}"), ("width", "width", "{:g}"),
    ("gflops", "GFLOPs", "{:.2f}"), ("latency_ms", "ms", "{:.1f}"), ("speedup", "speed-up", "{:.2f}"),
    ("gflops_per_s", "GFLOP/s", "{:.1f}"), ("backbone", "bb", "{:.1f}"), ("fpn", "fpn", "{:.1f}"),
    ("rpn", "rpn", "{:.1f}"), ("roi_heads", "roi", "{:.1f}"), ("poolers", "roialign", "{:.1f}"),
    ("nms_ms", "nms", "{:.1f}"), ("postprocess", "post", "{:.1f}"), ("other", "other", "{:.1f}"),
    ("slow_conv2d", "slow conv", "{:.0f}"), ("mkldnn_conv", "mkldnn conv", "{:.0f}"),
    ("copy_", "copy_", "{:.0f}"), ("plain_ms", "plain ms", "{:.1f}"),
]


def table(rows):
    flat = []
    for row in rows:
        d, ops = row["details_ms"], row["ops"] or {}
        flat.append(dict(row, **row["parts_ms"], **ops.get("calls", {}),
                         nms_ms=ops.get("self_ms", {}).get("nms"),
                         poolers=d["box_pooler"] + d["mask_pooler"] + d["keypoint_pooler"]))
    return _common.format_table(flat, COLUMNS)


def main(argv=None):
    p = _common.parser(__doc__.split("\n\n")[0], size=0, repeats=10)
    p.add_argument("--models", nargs="+", default=["shapes", "r50"], choices=sorted(DEFAULT_SIZES))
    p.add_argument("--shapes-weights", help="MODEL.WEIGHTS of the shapes model (random if unset)")
    p.add_argument("--r50-weights", help="MODEL.WEIGHTS of the R-50 model (random if unset)")
    p.add_argument("--dataset", help="images of this registered dataset instead of random pixels")
    p.add_argument("--score-thresh", type=float, default=0.0, help="ROI_HEADS.SCORE_THRESH_TEST")
    p.add_argument("--exported", action="store_true", help="also time each width's plain model")
    p.add_argument("--no-ops", action="store_true", help="skip the torch.profiler run")
    p.add_argument("--no-flops", action="store_true", help="skip the (slow) FLOP counts")
    p.add_argument("--without-speedups", nargs="*", choices=SPEEDUPS,
                   help="the 'before': undo these speed-ups (all when none is named)")
    p.set_defaults(device=None)
    args = _common.parse(p, argv)
    if args.without_speedups == []:
        args.without_speedups = list(SPEEDUPS)
    args.without_speedups = args.without_speedups or []
    args.sizes_of = lambda name: [args.size] if args.size else list(DEFAULT_SIZES[name])
    devices = [args.device] if args.device else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    rows, environments = [], []
    for device in devices:
        args.device = device
        for name in args.models:
            for scope in args.scopes if name == "r50" else [None]:
                rows += profile_model(args, name, scope)
        environments.append(dict(_common.environment(args), size=args.size or None))
    result = {
        "benchmark": "profile_widths",
        "environment": environments[0],
        "devices": [e["device"] for e in environments],
        "score_thresh_test": args.score_thresh,
        "inputs": args.dataset or "random",
        "rows": rows,
    }
    _common.emit(result, table(rows), args.json_out)
    return result


if __name__ == "__main__":
    main()
