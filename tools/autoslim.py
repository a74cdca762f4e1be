#!/usr/bin/env python
"""AutoSlim: search per-group channel counts of a trained slimmable detector under cost targets.

    python tools/autoslim.py --config-file configs/shapes/slim_universal_mask_rcnn_shapes.yaml \\
        --target-gflops 1.5 0.8 --output output/autoslim MODEL.WEIGHTS output/model_final.pth

Greedy slimming from full width (see slim_det/autoslim.py): each round removes ``--step`` of
one channel group's full channels, the group whose cut raises the detection loss least on
``--score-images`` held-out images, each candidate calibrated on ``--calibration-images``. For
every target, ``gflops_<target>.json`` holds the first configuration at or below it, with its
costs (load it with slim_det.load_channels; export it with tools/export_width.py --channels).
``search.json`` is the whole path and is rewritten every round: run the same command again to
resume. ``search.png`` plots the score of the path and of uniform widths against the cost.
``--target-latency-ms`` searches on a per-layer latency table measured first on this machine
(saved as ``latency_table.json`` and reused on resume; results ``ms_<target>.json``) instead of
GFLOPs.
"""
import argparse
import json
import logging
import os
import random
import time

import torch
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import slim_det  # noqa: F401  (registers slim_det's backbones, heads and datasets)
from slim_det.autoslim import (
    APScorer,
    ConvCost,
    LatencyCost,
    LossScorer,
    fixed_forward_ms,
    eta_seconds,
    greedy_search,
    load_state,
    save_state,
)
from slim_det.channels import channel_groups, save_channels, uniform_channels
from slim_det.config import load_slim_cfg
from slim_det.inputs import InputError, check_writable_dir, exit_on_input_error
from slim_det.weights import load_weights

logger = logging.getLogger("slim_det.autoslim")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the supernet's slim_det config")
    targets = parser.add_mutually_exclusive_group(required=True)
    targets.add_argument("--target-gflops", type=float, nargs="+",
                         help="GFLOPs targets (convs and linears, one image of --image-size)")
    targets.add_argument("--target-latency-ms", type=float, nargs="+",
                         help="latency targets in ms on this machine (a per-layer latency table "
                         "is measured first; see slim_det.autoslim.LatencyCost)")
    parser.add_argument("--output", required=True, help="folder for the results (resumable)")
    parser.add_argument("--step", type=float, default=1 / 12,
                        help="fraction of a group's full channels one cut removes (default 1/12)")
    parser.add_argument("--calibration-images", type=int, default=8,
                        help="training images that calibrate each candidate's BN statistics")
    parser.add_argument("--score-images", type=int, default=16,
                        help="held-out images on which each candidate's loss is measured")
    parser.add_argument("--proxy", choices=("loss", "ap", "ap50"), default="loss",
                        help="how a candidate is scored on the held-out images: minus the "
                        "detection loss, or box AP / AP50 (default loss; see the README)")
    parser.add_argument("--workers", type=int, default=1,
                        help="CPU processes scoring each round's candidates (each builds its own "
                        "model; torch threads are divided among them)")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset to draw images from (default DATASETS.TRAIN[0])")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size of the cost model (default INPUT.MAX_SIZE_TEST)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def _batches(cfg, dicts, is_train):
    # Test-time resizing in both cases; the score batches keep their annotations for the losses.
    mapper_args = DatasetMapper.from_config(cfg, is_train=is_train)
    mapper_args["augmentations"] = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST,
                                                         cfg.INPUT.MAX_SIZE_TEST)]
    mapper = DatasetMapper(**mapper_args)
    batch = max(1, cfg.SOLVER.IMS_PER_BATCH)
    loader = build_detection_test_loader(dicts, mapper=mapper, batch_size=batch, num_workers=0)
    return [list(b) for b in loader]


def _images(cfg, args):
    """Disjoint calibration and score batches from the training set (or ``args.dataset``): the
    same images on every run. ``args`` has ``dataset``, ``calibration_images``, ``score_images``."""
    name = args.dataset or cfg.DATASETS.TRAIN[0]
    dicts = get_detection_dataset_dicts([name], filter_empty=True)
    wanted = args.calibration_images + args.score_images
    if args.calibration_images < 1 or args.score_images < 1:
        raise InputError("--calibration-images and --score-images must be >= 1; got "
                         f"{args.calibration_images} and {args.score_images}.")
    if wanted > len(dicts):
        raise InputError(f"Dataset {name!r} has {len(dicts)} images with annotations; "
                         f"--calibration-images + --score-images asks for {wanted}.")
    order = list(range(len(dicts)))
    random.Random(0).shuffle(order)  # the same disjoint samples on every run (and resume)
    # Calibration images from the front of the order, score images from its back: either set
    # stays the same when the other's size changes.
    calibration = [dicts[i] for i in sorted(order[:args.calibration_images])]
    score = [dicts[i] for i in sorted(order[len(order) - args.score_images:])]
    return _batches(cfg, calibration, False), _batches(cfg, score, True), (name, score)


def build_scorer(cfg, model, args, output_dir):
    """The ``args.proxy`` scorer on the images `_images` picks."""
    calibration, score_batches, (name, score_dicts) = _images(cfg, args)
    if args.proxy == "loss":
        return LossScorer(model, calibration, score_batches)
    heldout = f"{name}_autoslim_heldout_{args.calibration_images}_{args.score_images}"
    if heldout not in DatasetCatalog.list():
        DatasetCatalog.register(heldout, lambda: score_dicts)
        metadata = MetadataCatalog.get(name).as_dict()
        for key in ("name", "json_file", "evaluator_type"):
            metadata.pop(key, None)
        MetadataCatalog.get(heldout).set(**metadata)
    loader = build_detection_test_loader(score_dicts, mapper=DatasetMapper(cfg, is_train=False),
                                         batch_size=max(1, cfg.SOLVER.IMS_PER_BATCH))
    metric = {"ap": "AP", "ap50": "AP50"}[args.proxy]
    # COCOEvaluator caches the held-out images' COCO-format ground truth (and predictions) here.
    return APScorer(model, calibration, loader, heldout, metric,
                    output_dir=os.path.join(output_dir, "heldout_eval"))


def _plot(state, uniform, path, unit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["cost"] for p in state["path"]], [p["score"] for p in state["path"]], "-",
            label="search path")
    ax.plot([u["cost"] for u in uniform], [u["score"] for u in uniform], "o", label="uniform width")
    for u in uniform:
        ax.annotate(f"{u['width']:g}", (u["cost"], u["score"]))
    for key, result in state["results"].items():
        ax.plot([result["cost"]], [result["score"]], "s", color="black")
    ax.set_xlabel("GFLOPs (convs and linears)" if unit == "gflops" else "predicted latency (ms)")
    ax.set_ylabel("score (minus detection loss)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_table(model, counts, output, check_widths=(0.75, 0.4), tolerance=0.25):
    """The per-layer latency table: measured now, or the one an earlier (interrupted) run of the
    search measured, from ``output/latency_table.json``, so that a resumed search keeps the cost
    model its first rounds used (a new measurement would differ by timing noise).

    A new table is checked before any search relies on it: at uniform ``check_widths`` (not the
    widths its rest was fitted on) its prediction must be within ``tolerance`` of the latency
    timed directly: a table that the
    machine's noise made (another job running while it was timed), or a forward whose time is
    not mostly its convs' and linears' sum plus a fixed rest, would silently optimise nonsense.

    Raises:
        InputError: the table fails the check (it is kept in ``latency_table.json`` to inspect,
            under another name, so that a rerun measures again).
    """
    path = os.path.join(output, "latency_table.json")
    if os.path.isfile(path):
        with open(path) as f:
            table = LatencyCost(model, *counts, table=json.load(f))
        logger.info(f"Latency table read from {path}: full width {table.full_ms:.1f} ms.")
        return table
    logger.info("Measuring the per-layer latency table (run nothing else on this machine "
                "meanwhile) ...")
    start = time.perf_counter()
    table = LatencyCost(model, *counts)
    configs = [uniform_channels(model, w) for w in check_widths]
    measured = fixed_forward_ms(model, counts, configs, warmup=2, repeats=5)
    checks = [{"width": w, "predicted_ms": table(c), "measured_ms": m}
              for w, c, m in zip(check_widths, configs, measured)]
    payload = dict(table.to_dict(), checks=checks)
    bad = [c for c in checks if abs(c["predicted_ms"] - c["measured_ms"]) > tolerance * c["measured_ms"]]
    if bad:
        rejected = os.path.join(output, "latency_table_rejected.json")
        with open(rejected, "w") as f:
            json.dump(payload, f, indent=1)
        raise InputError(
            "The per-layer latency table does not predict this machine's latency: "
            + "; ".join(f"at uniform width {c['width']:g} it predicts {c['predicted_ms']:.1f} ms, "
                        f"timed {c['measured_ms']:.1f} ms" for c in bad)
            + f" (allowed: within {tolerance:.0%}). Measure again with nothing else running on "
            f"this machine, or search on --target-gflops. The table is in {rejected}.")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    logger.info(f"Latency table measured in {time.perf_counter() - start:.0f} s: full width "
                f"{table.full_ms:.1f} ms; " + ", ".join(
                    f"width {c['width']:g} predicted {c['predicted_ms']:.1f} ms, timed "
                    f"{c['measured_ms']:.1f} ms" for c in checks) + f"; saved in {path}.")
    return table


_WORKER = {}


def _start_worker(config_file, weights_file, options, output, threads):
    torch.set_num_threads(threads)
    setup_logger(name="slim_det")
    logging.getLogger("slim_det").setLevel(logging.WARNING)  # the main process logs progress
    cfg = load_slim_cfg(config_file, [])
    model = build_model(cfg)
    model.load_state_dict(torch.load(weights_file, map_location=cfg.MODEL.DEVICE))
    model.eval()
    _WORKER["scorer"] = build_scorer(cfg, model, argparse.Namespace(**options), output)


def _score_in_worker(config):
    return _WORKER["scorer"](config)


class ParallelScorer:
    """A scorer whose ``many`` scores a round's candidates on several spawned CPU processes,
    each with its own copy of the model (see `slim_det.autoslim.greedy_search`)."""

    def __init__(self, scorer, cfg, args, output):
        import multiprocessing

        config_file = os.path.join(output, "search_config.yaml")
        with open(config_file, "w") as f:
            f.write(cfg.dump())
        # The workers load the main process's model exactly (whatever MODEL.WEIGHTS gave it).
        weights_file = os.path.join(output, "search_model.pth")
        torch.save(scorer.model.state_dict(), weights_file)
        options = {k: getattr(args, k) for k in ("dataset", "calibration_images",
                                                 "score_images", "proxy")}
        threads = max(1, torch.get_num_threads() // args.workers)
        self.scorer = scorer
        self.pool = multiprocessing.get_context("spawn").Pool(
            args.workers, initializer=_start_worker,
            initargs=(config_file, weights_file, options, output, threads))

    def __call__(self, config):
        return self.scorer(config)

    def many(self, configs):
        return self.pool.map(_score_in_worker, configs, chunksize=1)

    def close(self):
        self.pool.close()
        self.pool.join()


def main(argv=None):
    args = parse_args(argv)
    with exit_on_input_error("autoslim.py"):
        return _run(args)


def _run(args):
    if not 0 < args.step <= 1:
        raise InputError(f"--step must be a fraction in (0, 1]; got {args.step}.")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1; got {args.workers}.")
    check_writable_dir(args.output)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"), name="slim_det")
    setup_logger(output=os.path.join(args.output, "log.txt"))
    cfg = load_slim_cfg(args.config_file, args.opts)
    model = build_model(cfg)
    load_weights(cfg, model)  # refuses a checkpoint that leaves model tensors unloaded
    model.eval()
    groups = channel_groups(model)
    logger.info(f"{len(groups)} channel groups: " + ", ".join(
        f"{g.name} ({g.full})" for g in groups))
    size = args.image_size or cfg.INPUT.MAX_SIZE_TEST
    counts = ((size, size), cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)
    gflops = ConvCost(model, *counts)
    if args.target_latency_ms:
        cost, unit, targets = latency_table(model, counts, args.output), "ms", args.target_latency_ms
    else:
        cost, unit, targets = gflops, "gflops", args.target_gflops
    scorer = build_scorer(cfg, model, args, args.output)
    if args.workers > 1:
        scorer = ParallelScorer(scorer, cfg, args, args.output)
    state_path = os.path.join(args.output, "search.json")
    images = {"dataset": args.dataset or cfg.DATASETS.TRAIN[0], "proxy": args.proxy,
              "calibration_images": args.calibration_images, "score_images": args.score_images}
    state = load_state(state_path)
    if state is not None:
        if state.get("images", images) != images:
            raise InputError(f"{state_path} was searched with images {state['images']}, not "
                             f"{images}: use the same options to resume, or another --output.")
        logger.info(f"Resuming the search in {state_path} after {len(state['path']) - 1} rounds.")
    else:
        state = {"images": images}

    def on_round(state):
        save_state(state, state_path)
        last, eta = state["path"][-1], eta_seconds(state)
        logger.info(f"round {len(state['path']) - 1}: cut {last['cut']} -> "
                    f"{last['channels'][last['cut']]} channels, {last['cost']:.4f} {unit}, "
                    f"score {last['score']:.4f}, {last['seconds']:.1f} s"
                    + ("" if eta is None else f", ETA {eta / 60:.1f} min"))

    try:
        state = greedy_search(groups, cost, scorer, targets, step=args.step, state=state,
                              on_round=on_round)
    finally:
        if isinstance(scorer, ParallelScorer):
            scorer.close()
    save_state(state, state_path)
    uniform = []
    for width in sorted(set(cfg.MODEL.SLIM.WIDTHS) | {0.25, 0.5, 0.75, 1.0}):
        config = uniform_channels(model, width)
        uniform.append({"width": width, "cost": cost(config), "score": scorer(config)})
    rows = [f"| target {unit} | found {unit} | GFLOPs | score | uniform width ({unit}, score) "
            "at or below it |", "|---|---|---|---|---|"]
    for key, result in sorted(state["results"].items(), key=lambda kv: -float(kv[0])):
        below = [u for u in uniform if u["cost"] <= float(key)]
        best = max(below, key=lambda u: u["cost"]) if below else None
        save_channels(result["channels"], os.path.join(args.output, f"{unit}_{key}.json"),
                      costs={unit: result["cost"], "gflops": gflops(result["channels"]),
                             "score": result["score"], "image_size": size})
        rows.append(f"| {key} | {result['cost']:.4f} | {gflops(result['channels']):.4f} | "
                    f"{result['score']:.4f} | " + (
            f"{best['width']:g} ({best['cost']:.4f}, {best['score']:.4f})" if best else "-")
            + " |")
    _plot(state, uniform, os.path.join(args.output, "search.png"), unit)
    logger.info(f"AutoSlim results (score: {args.proxy} proxy on held-out images):\n"
                + "\n".join(rows))
    return state


if __name__ == "__main__":
    main()
