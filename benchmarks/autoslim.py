#!/usr/bin/env python
"""Does the AutoSlim search beat uniform width and random configurations of the same GFLOPs?

    python benchmarks/autoslim.py --config-file configs/shapes/slim_universal_mask_rcnn_shapes.yaml \\
        --supernet output/supernet/model_final.pth --search output/autoslim \\
        --targets 1.5 0.8 [--random 2] [--seeds 0 1 2] [--rank-configs 12] \\
        [--output-dir output/autoslim_bench] [KEY VALUE ...]

For each target of a finished search (``--search``: tools/autoslim.py's folder), three kinds of
configuration of (about) the searched one's GFLOPs:

- ``searched``: the search's ``gflops_<target>.json``;
- ``uniform``: the uniform width whose cost is closest to it (a 0.005 grid);
- ``random_<k>``: per-group fractions drawn uniformly from [0.25, 1], scaled together until the
  cost is within 2% of the searched one (seeded, the same on every run).

Each is (1) evaluated inside the supernet, its batch norms calibrated on TEST.CALIBRATION_IMAGES
training images, on DATASETS.TEST[0]; and (2) retrained from scratch as a plain model with the
supernet's schedule (``tools/train_net.py MODEL.SLIM.INDIVIDUAL_CHANNELS <json> SEED <s>``, one
folder per run, finished runs reused) for each ``--seeds``, and evaluated there. Also: its GFLOPs
(convs and linears), parameters and CPU latency of the plain model, and the rank correlation of
the search's proxy (minus the detection loss on held-out training images, as the search scored it)
with box AP inside the supernet over the configurations above plus ``--rank-configs`` random
configurations spread over the whole cost range. Prints a table and writes ``autoslim.{json,md}``.
"""
import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import slim_det  # noqa: E402,F401
from slim_det.analysis import latency_ms  # noqa: E402
from slim_det.autoslim import ConvCost, forget_configuration  # noqa: E402
from slim_det.calibration import build_calibration_loader, calibrate_norms  # noqa: E402
from slim_det.channels import (  # noqa: E402
    channel_groups,
    load_channels,
    save_channels,
    set_channels,
    uniform_channels,
)
from slim_det.config import load_slim_cfg  # noqa: E402
from slim_det.individual import build_channel_model  # noqa: E402
from slim_det.weights import load_weights  # noqa: E402

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="the supernet's config")
    p.add_argument("--supernet", required=True, help="the supernet's checkpoint")
    p.add_argument("--search", required=True, help="tools/autoslim.py's output folder")
    p.add_argument("--targets", type=float, nargs="+", required=True)
    p.add_argument("--random", type=int, default=2, help="random configurations per target")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="retraining seeds (none: only the in-supernet evaluation)")
    p.add_argument("--rank-configs", type=int, default=12,
                   help="extra random configurations for the proxy's rank correlation")
    p.add_argument("--calibration-counts", type=int, nargs="+", default=[2, 8, 32],
                   help="calibration images of the loss proxies compared for ranking")
    p.add_argument("--retrain-targets", type=float, nargs="+", default=None,
                   help="retrain only the configurations of these targets (default: all)")
    p.add_argument("--retrain-kinds", nargs="+", default=None,
                   help="start new retraining runs only for these kinds (searched, uniform, "
                   "random; default: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="retraining runs at a time (torch threads divided among them)")
    p.add_argument("--output-dir", default="output/autoslim_bench")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p.parse_args(argv)


def spearman(a, b):
    """Spearman's rank correlation (ties get their mean rank)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else float("nan")


def random_config(groups, cost, goal, rng, tolerance=0.02):
    """Per-group fractions in [0.25, 1], scaled together (bisection) to cost ``goal`` within 2%."""
    fractions = {g.name: rng.uniform(0.25, 1.0) for g in groups}

    def at(scale):
        config = {}
        for g in groups:
            want = min(1.0, fractions[g.name] * scale) * g.full
            config[g.name] = min(g.allowed, key=lambda c: abs(c - want))
        return config

    low, high = 0.0, 1.0 / min(fractions.values())
    for _ in range(40):
        mid = (low + high) / 2
        if cost(at(mid)) > goal:
            high = mid
        else:
            low = mid
    best = min((at(low), at(high)), key=lambda c: abs(cost(c) - goal))
    if abs(cost(best) - goal) > tolerance * goal:
        return None
    return best


def uniform_of_cost(model, cost, goal, low):
    grid = [round(low + 0.005 * i, 3) for i in range(int((1 - low) / 0.005) + 1)]
    width = min(grid, key=lambda w: abs(cost(uniform_channels(model, w)) - goal))
    return width, uniform_channels(model, width)


@torch.no_grad()
def evaluate_in_supernet(cfg, model, config, calibration, dataset):
    """Box / mask AP of the supernet at ``config`` after calibrating it."""
    config = set_channels(model, config)
    calibrate_norms(model, calibration, [config], cfg.TEST.CALIBRATION_IMAGES)
    loader = build_detection_test_loader(cfg, dataset)
    results = inference_on_dataset(model, loader, COCOEvaluator(dataset, output_dir=None))
    forget_configuration(model, config)
    return {"box_ap": results["bbox"]["AP"], "box_ap50": results["bbox"]["AP50"],
            "mask_ap": results.get("segm", {}).get("AP")}


def _read(args, name):
    path = os.path.join(args.output_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write(args, name, payload):
    with open(os.path.join(args.output_dir, name), "w") as f:
        json.dump(payload, f, indent=1)


def retrain(args, name, config_file, seed, dataset, threads, train=True):
    """Train the plain model of ``config_file`` from scratch (or reuse a finished run); None if
    the run has not finished and ``train`` is False."""
    folder = os.path.join(args.output_dir, "runs", f"{name}_seed{seed}")
    table = os.path.join(folder, dataset, "width_table.json")
    if not os.path.isfile(table) and not train:
        return None
    if not os.path.isfile(table):
        os.makedirs(folder, exist_ok=True)
        command = [sys.executable, TRAIN_NET, "--config-file", args.config_file] + args.opts + [
            "MODEL.SLIM.INDIVIDUAL_CHANNELS", os.path.abspath(config_file), "MODEL.WEIGHTS", "",
            "SEED", str(seed), "OUTPUT_DIR", folder]
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads))
        start = time.perf_counter()
        with open(os.path.join(folder, "train_net.log"), "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            raise SystemExit(f"{name} seed {seed} failed; see {folder}/train_net.log")
        with open(os.path.join(folder, "run.json"), "w") as f:
            json.dump({"command": command, "seconds": time.perf_counter() - start}, f)
    with open(table) as f:
        (row,) = json.load(f)["rows"]
    return {k: row.get(k) for k in ("box_ap", "box_ap50", "mask_ap")}


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "min": min(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def main(argv=None):
    args = parse_args(argv)
    cfg = load_slim_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", args.supernet])
    os.makedirs(os.path.join(args.output_dir, "configs"), exist_ok=True)
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    groups = channel_groups(model)
    size = cfg.INPUT.MAX_SIZE_TEST
    cost = ConvCost(model, (size, size), cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                    cfg.TEST.DETECTIONS_PER_IMAGE)
    dataset = cfg.DATASETS.TEST[0]
    calibration, _ = build_calibration_loader(cfg, cfg.TEST.CALIBRATION_IMAGES)
    calibration = [list(b) for b in calibration]
    low = min(cfg.MODEL.SLIM.get("WIDTH_RANGE", [0.25, 1.0])[0], min(cfg.MODEL.SLIM.WIDTHS))
    rng = random.Random(0)

    with open(os.path.join(args.search, "search.json")) as f:
        search_state = json.load(f)
    candidates = []  # (target, kind, config)
    for target in sorted(args.targets, reverse=True):
        path = os.path.join(args.search, f"gflops_{target:g}.json")
        searched = load_channels(path)
        goal = cost(searched)
        width, uniform = uniform_of_cost(model, cost, goal, low)
        candidates += [(target, "searched", searched), (target, f"uniform_{width:g}", uniform)]
        for k in range(args.random):
            config = None
            while config is None:
                config = random_config(groups, cost, goal, rng)
            candidates.append((target, f"random_{k}", config))

    # The proxy, as the search computed it (same images, same seed).
    sys.argv = [sys.argv[0]]
    import autoslim as tool  # tools/autoslim.py

    searched_with = dict(search_state["images"])  # the images and proxy the search scored with
    proxy = tool.build_scorer(cfg, model, argparse.Namespace(**searched_with), args.output_dir)
    # Candidate proxies for the rank correlation: the loss with several calibration sizes, and
    # box AP / AP50, all on the search's score images.
    proxies = {}
    for count in args.calibration_counts:
        options = dict(searched_with, proxy="loss", calibration_images=count)
        proxies[f"loss_cal{count}"] = tool.build_scorer(cfg, model, argparse.Namespace(**options),
                                                        args.output_dir)
    for name in ("ap50", "ap"):
        proxies[name] = tool.build_scorer(cfg, model, argparse.Namespace(
            **dict(searched_with, proxy=name)), args.output_dir)

    # A rerun (e.g. to retrain more targets) reuses the in-supernet results and the rank points
    # of an earlier run with the same configurations.
    saved = _read(args, "autoslim_supernet.json")
    saved = {(r["target"], r["kind"], json.dumps(
        r.get("channels") or dict(load_channels(r["config_file"])), sort_keys=True)): r
        for r in (saved or {}).get("rows", [])}
    rows = []
    for target, kind, config in candidates:
        name = f"t{target:g}_{kind}"
        key = (target, kind, json.dumps(dict(config), sort_keys=True))
        if key in saved:
            rows.append(saved[key])
            continue
        config_file = os.path.join(args.output_dir, "configs", f"{name}.json")
        save_channels(config, config_file, costs={"gflops": cost(config)})
        plain = build_channel_model(cfg, config).eval()
        image = [{"image": torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
                  * 255}]
        row = {"target": target, "kind": kind, "gflops": cost(config),
               "params_m": sum(p.numel() for p in plain.parameters()) / 1e6,
               "latency_ms": latency_ms(plain, image, warmup=2, repeats=5),
               "proxy": proxy(config)}
        row["supernet"] = evaluate_in_supernet(cfg, model, config, calibration, dataset)
        row["proxies"] = {name: scorer(config) for name, scorer in proxies.items()}
        row["config_file"], row["name"], row["channels"] = config_file, name, dict(config)
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(args, "autoslim_supernet.json", {"rows": rows})

    rank = [dict(r["proxies"], box_ap=r["supernet"]["box_ap"], gflops=r["gflops"]) for r in rows]
    earlier = _read(args, "autoslim_rank.json")
    extra = (earlier or {}).get("points", [])[len(rows):]
    if len(extra) == args.rank_configs and set(extra[0] if extra else proxies) >= set(proxies):
        rank += extra
    for k in range(args.rank_configs if len(rank) == len(rows) else 0):
        goal = rng.uniform(cost({g.name: g.allowed[0] for g in groups}) * 1.2,
                           cost({g.name: g.full for g in groups}) * 0.95)
        config = None
        while config is None:
            config = random_config(groups, cost, goal, rng, tolerance=0.05)
        point = {name: scorer(config) for name, scorer in proxies.items()}
        point["box_ap"] = evaluate_in_supernet(cfg, model, config, calibration, dataset)["box_ap"]
        point["gflops"] = cost(config)
        rank.append(point)
        print(json.dumps(point), flush=True)
    correlations = {name: spearman([p[name] for p in rank], [p["box_ap"] for p in rank])
                    for name in list(proxies) + ["gflops"]}
    _write(args, "autoslim_rank.json", {"points": rank, "spearman_by_proxy": correlations})

    # Retraining: every (configuration, seed) run, --jobs at a time, torch threads split evenly.
    # Finished runs are always read; --retrain-targets / --retrain-kinds only limit new ones.
    def wanted(row):
        return ((args.retrain_targets is None
                 or any(abs(row["target"] - t) < 1e-9 for t in args.retrain_targets))
                and (args.retrain_kinds is None
                     or any(row["kind"].startswith(k) for k in args.retrain_kinds)))

    plan = [(r, seed) for r in rows for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda item: retrain(args, item[0]["name"], item[0]["config_file"],
                                                  item[1], dataset, threads,
                                                  train=wanted(item[0])), plan))
    for row in rows:
        runs = [dict(run, seed=seed) for (r, seed), run in zip(plan, done)
                if r is row and run is not None]
        row["retrained"] = {key: summary([r[key] for r in runs]) for key in ("box_ap", "mask_ap")}
        row["retrained_runs"] = runs

    used = searched_with.get("proxy", "loss")
    used = f"loss_cal{searched_with['calibration_images']}" if used == "loss" else used

    def fmt(s):
        return "-" if s is None else (f"{s['mean']:.1f} ± {s['std']:.1f} (min {s['min']:.1f}, "
                                      f"n={s['n']})")

    lines = ["| target | configuration | GFLOPs | params (M) | latency (ms) | proxy | supernet "
             "box AP | supernet mask AP | retrained box AP | retrained mask AP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["supernet"]
        lines.append(
            f"| {r['target']:g} | {r['kind']} | {r['gflops']:.3f} | {r['params_m']:.2f} | "
            f"{r['latency_ms']:.1f} | {r['proxy']:.3f} | {s['box_ap']:.1f} | "
            f"{s['mask_ap'] if s['mask_ap'] is None else round(s['mask_ap'], 1)} | "
            f"{fmt(r['retrained']['box_ap'])} | {fmt(r['retrained']['mask_ap'])} |")
    rounds = search_state["path"][1:]
    md = ("\n".join(lines) + f"\n\nSpearman rank correlation with box AP in the supernet over "
          f"{len(rank)} configurations: " + ", ".join(
              f"{name} {value:.2f}" for name, value in correlations.items())
          + f" (the search used {used}). Search: {len(rounds)} rounds, "
          f"{sum(p['seconds'] for p in rounds) / 60:.1f} min. Retrained seeds {args.seeds}; "
          f"evaluated on {dataset}.\n")
    result = {"benchmark": "autoslim", "rows": rows, "spearman_by_proxy": correlations,
              "search_proxy": used,
              "rank_points": rank, "search_rounds": len(rounds),
              "search_minutes": sum(p["seconds"] for p in rounds) / 60,
              "seeds": args.seeds, "dataset": dataset, "config_file": args.config_file}
    with open(os.path.join(args.output_dir, "autoslim.md"), "w") as f:
        f.write(md)
    _write(args, "autoslim.json", result)
    print(md)
    print(json.dumps({k: result[k] for k in ("spearman_by_proxy", "search_rounds",
                                             "search_minutes")}))
    return result


if __name__ == "__main__":
    main()
