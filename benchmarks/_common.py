"""What every benchmark shares: flags, model building, synthetic data, timing and output.

Default models are the repository's R50-FPN Mask R-CNN configs (randomly initialised: latency does
not depend on the weights; ROI_HEADS.SCORE_THRESH_TEST 0 so every image yields the full 100
detections and the mask head always runs). ``--tiny`` builds a few-channel model on 64 px inputs
so the test suite can run every benchmark in seconds.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import slim_det
from slim_det.analysis import latency_ms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "backbone": os.path.join(REPO, "configs", "slim_mask_rcnn.yaml"),
    "all": os.path.join(REPO, "configs", "slim_mask_rcnn_all.yaml"),
}
WIDTHS = [1.0, 0.75, 0.5, 0.25]
# Few channels (divisible by 8 at every width, so tiny exports stay stock) and small heads.
TINY_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 32, "MODEL.RESNETS.RES2_OUT_CHANNELS", 128,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 32, "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "TEST.DETECTIONS_PER_IMAGE", 10,
    "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0,
]


def parser(description, size=512, batch=1, warmup=2, repeats=5, scopes=("all",)):
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a tiny model on 64 px inputs (tests)")
    p.add_argument("--size", type=int, default=size, help="square input side in pixels")
    p.add_argument("--batch", type=int, default=batch, help="images per batch")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed runs")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs (median reported)")
    p.add_argument("--widths", type=float, nargs="+", default=WIDTHS)
    p.add_argument("--scopes", nargs="+", default=list(scopes), choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    return p


def parse(p, argv=None):
    """Parse, apply ``--tiny`` defaults and ``--threads``."""
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.warmup, args.repeats = 64, min(args.batch, 2), 0, 1
        args.widths, args.scopes = [1.0, 0.5], args.scopes[-1:]
        # Tiny runs check that a benchmark works, not how fast it is. oneDNN builds kernels on the
        # first call of every conv shape, which costs more than a tiny run itself, and tiny ops
        # gain nothing from a second thread but lose a lot on a busy machine.
        torch.backends.mkldnn.enabled = False
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_cfg(args, scope, config_file=None):
    """The slim config of ``scope`` (or ``config_file``) with the benchmark's device, tiny and
    extra options."""
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(config_file or CONFIGS[scope])
    opts = [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.SLIM.WIDTHS", sorted(set(args.widths) | {1.0}),
    ]
    cfg.merge_from_list(opts + (TINY_OPTS if args.tiny else []) + list(args.opts))
    cfg.freeze()
    return cfg


def build_slim_model(args, scope, config_file=None):
    """(cfg, model) of ``scope`` (or ``config_file``) in eval mode; BN statistics set at every
    width when BN is used."""
    cfg = build_cfg(args, scope, config_file)
    model = build_model(cfg)
    calibrate_bn(model, args.widths, args.size, args.device)
    return cfg, model.eval()


def calibrate_bn(model, widths, size, device):
    """Give every BN of every width statistics from a few random images.

    Random init leaves BN running stats at (0, 1), which makes eval-mode activations explode. A
    cumulative average over one batch per width (BN in train mode, no gradient) fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    images = torch.randint(0, 256, (2, 3, size, size), device=device).float()
    images = (images - model.pixel_mean) / model.pixel_std
    model.train()
    with torch.no_grad():
        for width in widths:
            slim_det.set_width(model, width)
            model.backbone(images)
    model.eval()
    slim_det.set_width(model, 1.0)


def random_images(batch, size, seed=0):
    """``batch`` detectron2 inference inputs of random pixels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), generator=generator).float()}
        for _ in range(batch)
    ]


def random_training_batch(batch, size, num_classes, objects=4, seed=0):
    """``batch`` detectron2 training inputs with random boxes, classes and box-shaped masks."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for item in random_images(batch, size, seed):
        corners = torch.rand(objects, 2, 2, generator=generator) * size
        boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + size / 8).clamp(max=size)
        masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            mask[y0:y1, x0:x1] = True
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (objects,), generator=generator)
        instances.gt_masks = BitMasks(masks)
        data.append(dict(item, instances=instances))
    return data


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_latency(models, inputs, warmup, repeats):
    """Median latency of each model, alternating models run by run.

    Alternating spreads slow drifts of a shared machine evenly over all models, which matters for
    ratios close to 1.

    Args:
        models (dict[str, nn.Module]): the models to compare.

    Returns:
        dict[str, float]: median milliseconds per model.
    """
    times = {name: [] for name in models}
    for run in range(warmup + repeats):
        for name, model in models.items():
            ms = latency_ms(model, inputs, warmup=0, repeats=1)
            if run >= warmup:
                times[name].append(ms)
    return {name: statistics.median(values) for name, values in times.items()}


class PeakMemory:
    """Peak memory a block adds, in MiB: CUDA allocator peak on GPU, sampled RSS on CPU.

    On CPU the resident set is sampled every millisecond by a thread (after returning freed heap
    memory to the OS, so earlier steps do not hide this one's allocations).
    """

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.mib = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        self._start = self._peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._done.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.mib = (peak - self._start) / 2**20
        return False


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS peaks are then lower bounds


def environment(args):
    """Where the numbers were taken, for the JSON output."""
    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "size": args.size,
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tiny": args.tiny,
        # Other work on the machine skews CPU timings; the load says how busy it was at the end.
        "load_average_1m": os.getloadavg()[0],
    }


def format_table(rows, columns):
    """A plain-text table of ``rows`` (dicts) with ``columns`` [(key, header, format)]."""
    header = [h for _, h, _ in columns]
    body = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in columns] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [header] + body]
    return "\n".join(lines)


def emit(result, table, json_out=None):
    """Print the table, then the JSON result as the last line of stdout."""
    print(table)
    text = json.dumps(result)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")
    print(text)
    sys.stdout.flush()


def now():
    synchronize()
    return time.perf_counter()
