"""AutoSlim: greedy search of per-group channel counts on a trained slimmable detector.

Starting at full width, each round tries removing one step (a fraction of its full channels)
from every channel group in turn, scores each candidate on held-out images after calibrating
its batch-norm statistics, and keeps the cut that hurts the score least. Each time the cost
falls to a target, the configuration is recorded. The search is deterministic for a given
scorer, and its state is written after every round, so an interrupted search resumes.

The pieces are independent: `ConvCost` (cost of a configuration), `LossScorer` (how good it
is), `greedy_search` (the loop). `tools/autoslim.py` wires them to a config and a checkpoint.
"""
import abc
import copy
import json
import logging
import math
import os
import time

import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from .calibration import calibrate_norms, switchable_norms
from .channels import ChannelConfig, channel_groups, layer_links, set_channels, uniform_channels
from .inputs import InputError
from .layers import SlimConv2d, SlimConvTranspose2d, SlimLinear, SwitchableNorm
from .width import set_width

__all__ = ["ConvCost", "LatencyCost", "time_op", "fixed_forward_ms", "LossScorer", "APScorer", "one_step_down", "greedy_search", "forget_configuration",
           "save_state", "load_state", "eta_seconds"]

logger = logging.getLogger(__name__)


def _fixed_count_copy(model, image_size, num_proposals, num_detections):
    """A copy of ``model`` at full width, its batch norms on batch statistics (an uncalibrated
    universal model runs too; shapes, not values, matter here), wrapped in the fixed-count forward
    of `slim_det.analysis.detector_costs`; and the zero image it runs on.

    Returns:
        tuple(nn.Module, nn.Module, Tensor): the copy, its fixed-count forward, the image.
    """
    from .analysis import _FixedCountRCNN

    copy_ = copy.deepcopy(model)
    set_width(copy_, 1.0)
    copy_.eval()
    for norm in switchable_norms(copy_):
        norm.train()
    image = torch.zeros(1, 3, *image_size, device=next(copy_.parameters()).device)
    return copy_, _FixedCountRCNN(copy_, num_proposals, num_detections), image


def _visit_calls(model, counts, visit):
    """Run the fixed-count forward of a full-width copy of ``model`` (``counts``: image size,
    proposals, detections) and call ``visit(layer, input, output, link)`` for every call of a
    slimmable conv, transposed conv or linear (``link``: its `slim_det.channels.LayerLink` or
    None)."""
    model = getattr(model, "module", model)
    links = layer_links(model)
    copy_, fixed, image = _fixed_count_copy(model, *counts)
    names = {id(m): n for n, m in copy_.named_modules()}
    handles = [m.register_forward_hook(
        lambda layer, args, output: visit(layer, args[0], output, links.get(names[id(layer)])))
        for m in copy_.modules() if isinstance(m, (SlimConv2d, SlimLinear, SlimConvTranspose2d))]
    with torch.no_grad():
        fixed(image)
    for handle in handles:
        handle.remove()


class ConvCost:
    """GFLOPs of a detector's convs and linears at any channel configuration, in microseconds.

    The shapes of every conv / linear call are recorded once, at full width, on one image of
    ``image_size`` with the box head on ``num_proposals`` ROIs and the mask / keypoint heads on
    ``num_detections`` ROIs (as `slim_det.analysis.detector_costs`, so the cost does not depend
    on what the model detects). A configuration's cost then multiplies channel counts. Norms,
    ROI pooling and NMS are not counted (fvcore's count of them is a few percent).

    Args:
        model (nn.Module): a slimmable detectron2 R-CNN.
        image_size (tuple[int, int]): (height, width) of the padded input.
        num_proposals (int): ROIs through the box head.
        num_detections (int): ROIs through the mask / keypoint heads.
    """

    def __init__(self, model, image_size, num_proposals, num_detections):
        self.calls = []

        def visit(layer, x, output, link):
            if isinstance(layer, SlimLinear):
                spread = link.spread if link else 1
                full_in, full_out = x.shape[-1] // spread, output.shape[-1]
                per_pair = spread * output.numel() // full_out
            else:
                full_in, full_out = x.shape[1], output.shape[1]
                kernel = layer.kernel_size[0] * layer.kernel_size[1]
                spatial = (x if isinstance(layer, SlimConvTranspose2d) else output)[0, 0].numel()
                per_pair = kernel * spatial * x.shape[0]
            depthwise = isinstance(layer, SlimConv2d) and layer.is_depthwise
            self.calls.append((link.out_group if link else None, link.in_group if link else None,
                               full_in, full_out, per_pair, depthwise))

        _visit_calls(model, (image_size, num_proposals, num_detections), visit)

    def __call__(self, config):
        """GFLOPs (one multiply-add = one FLOP, as fvcore) of ``config`` (group -> channels)."""
        total = 0
        for out_group, in_group, full_in, full_out, per_pair, depthwise in self.calls:
            inputs = full_in if in_group is None else config[in_group]
            if depthwise:
                total += inputs * (full_out // full_in) * per_pair
            else:
                outputs = full_out if out_group is None else config[out_group]
                total += inputs * outputs * per_pair
        return total / 1e9


def fixed_forward_ms(model, counts, configs, warmup=1, repeats=3):
    """Median milliseconds of the fixed-count forward of `ConvCost` at each configuration.

    Args:
        counts (tuple): (image_size, num_proposals, num_detections), as `ConvCost` takes them.
        configs (list[dict]): channel configurations.
        warmup, repeats (int): untimed and timed runs per configuration.
    """
    copy_, fixed, image = _fixed_count_copy(getattr(model, "module", model), *counts)
    result = []
    with torch.no_grad():
        for config in configs:
            set_channels(copy_, config)
            times = []
            for i in range(warmup + repeats):
                start = time.perf_counter()
                fixed(image)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
            result.append(sorted(times)[len(times) // 2])
    return result


def _op_signature(layer, x, output, link):
    """What one conv / linear call computes, apart from its channel counts: a JSON-ready dict."""
    if isinstance(layer, SlimLinear):
        spread = link.spread if link else 1
        return {"kind": "linear", "rows": int(x.numel() // x.shape[-1]), "spread": spread,
                "multiplier": 0, "full_in": x.shape[-1] // spread, "full_out": output.shape[-1]}
    kind = "conv_transpose" if isinstance(layer, SlimConvTranspose2d) else "conv"
    depthwise = isinstance(layer, SlimConv2d) and layer.is_depthwise
    return {"kind": kind, "batch": x.shape[0], "size": list(x.shape[2:]),
            "out_size": list(output.shape[2:]), "kernel": list(layer.kernel_size),
            "stride": list(layer.stride), "padding": list(layer.padding),
            "dilation": list(layer.dilation),
            "multiplier": output.shape[1] // x.shape[1] if depthwise else 0,
            "full_in": x.shape[1], "full_out": output.shape[1]}


def _run_op(op, c_in, c_out, device):
    """A function computing ``op`` (see `_op_signature`) at ``c_in`` / ``c_out`` channels, on
    random data, with contiguous weights as slim layers use in inference."""
    import torch.nn.functional as F

    if op["kind"] == "linear":
        x = torch.randn(op["rows"], c_in * op["spread"], device=device)
        w = torch.randn(c_out, c_in * op["spread"], device=device)
        return lambda: F.linear(x, w)
    x = torch.randn(op["batch"], c_in, *op["size"], device=device)
    args = (op["stride"], op["padding"])
    if op["kind"] == "conv_transpose":
        w = torch.randn(c_in, c_out, *op["kernel"], device=device)
        return lambda: F.conv_transpose2d(x, w, None, *args)
    if op["multiplier"]:  # depthwise: its output follows its input
        w = torch.randn(c_in * op["multiplier"], 1, *op["kernel"], device=device)
        return lambda: F.conv2d(x, w, None, *args, op["dilation"], c_in)
    w = torch.randn(c_out, c_in, *op["kernel"], device=device)
    return lambda: F.conv2d(x, w, None, *args, op["dilation"])


def time_op(op, c_in, c_out, warmup=2, repeats=7, device="cpu"):
    """Median milliseconds of one call of ``op`` (see `_op_signature`) at these channel counts."""
    call = _run_op(op, c_in, c_out, device)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


class LatencyCost:
    """Predicted milliseconds of a configuration, from a per-layer latency table measured once.

    Every conv / linear call of the fixed-count forward of `ConvCost` is recorded once (its
    kind, input size, kernel, ...), identical calls merged; each is then timed *in isolation*
    on a grid of its input and output channel counts (the allowed counts of its groups, every
    ``stride``-th plus the smallest and the full). A configuration's latency is the sum, over
    calls, of their time at its channels (bilinear between grid points), plus the rest of the
    forward: norms, activations, ROI pooling and Python, which shrink with the channels too. The
    rest is modelled as ``base + per_element * (output values of the calls)`` (norms and
    activations touch every output value), fitted by least squares to the fixed-count forward
    timed at uniform ``rest_widths`` minus the table's sum there. A call timed alone takes
    microseconds to milliseconds and repeats cheaply, so the table is far less noisy than
    differences of whole forwards; it also sees the kernel each channel count really gets
    (small convs on CPU leave oneDNN).

    Args:
        model (nn.Module): a slimmable detectron2 R-CNN, on the device to time.
        image_size, num_proposals, num_detections: as `ConvCost`.
        stride (int): time every ``stride``-th allowed count of a group (fewer measurements).
        warmup, repeats (int): untimed and timed calls per measurement (median kept).
        timer (callable or None): ``timer(op, c_in, c_out) -> ms`` replacing `time_op` (tests).
        rest_widths (tuple[float]): the uniform widths the rest is fitted on.
        forward_timer (callable or None): ``forward_timer(configs) -> [ms]`` replacing the timed
            fixed-count forward (tests).
        table (dict or None): a table from `to_dict` (e.g. saved by an interrupted search) to use
            instead of measuring; it must hold exactly the model's calls and groups.
    """

    def __init__(self, model, image_size, num_proposals, num_detections, stride=1, warmup=2,
                 repeats=7, timer=None, rest_widths=(1.0, 0.5, 0.25), forward_timer=None,
                 table=None):
        model = getattr(model, "module", model)
        self.groups = {g.name: g for g in channel_groups(model)}
        self.ops = self._record(model, image_size, num_proposals, num_detections)
        if table is not None:
            self._load(table)
            return
        device = next(model.parameters()).device
        timer = timer or (lambda op, c_in, c_out: time_op(op, c_in, c_out, warmup, repeats,
                                                          device))
        timed = {}  # calls of the same shape in different groups are timed once

        def time_once(op, c_in, c_out):
            key = (_op_key(op, with_groups=False), c_in, c_out)
            if key not in timed:
                timed[key] = timer(op, c_in, c_out)
            return timed[key]

        for op in self.ops:
            op["grid_in"] = self._grid(op["in_group"], op["full_in"], stride)
            op["grid_out"] = ([0] if op["multiplier"] else
                              self._grid(op["out_group"], op["full_out"], stride))
            op["ms"] = [[time_once(op, c_in, c_out) for c_out in op["grid_out"]]
                        for c_in in op["grid_in"]]
        self.measurements = len(timed)
        counts = (image_size, num_proposals, num_detections)
        forward_timer = forward_timer or (
            lambda configs: fixed_forward_ms(model, counts, configs, warmup, repeats))
        configs = [uniform_channels(model, w) for w in rest_widths]
        self.fit = [{"width": w, "measured_ms": float(ms)}
                    for w, ms in zip(rest_widths, forward_timer(configs))]
        self.base_ms, self.ms_per_melement = _fit_line(
            [self.elements(c) / 1e6 for c in configs],
            [f["measured_ms"] - self.layers_ms(c) for f, c in zip(self.fit, configs)])
        for f, config in zip(self.fit, configs):
            f["predicted_ms"] = self(config)
        self.full_ms = self(self.full_config())

    @staticmethod
    def _record(model, image_size, num_proposals, num_detections):
        merged = {}

        def visit(layer, x, output, link):
            op = _op_signature(layer, x, output, link)
            op.update(in_group=link.in_group if link else None,
                      out_group=link.out_group if link else None)
            merged.setdefault(_op_key(op), dict(op, calls=0))["calls"] += 1

        _visit_calls(model, (image_size, num_proposals, num_detections), visit)
        return list(merged.values())

    def _grid(self, group, full, stride):
        if group is None:
            return [full]
        allowed = self.groups[group].allowed  # ascending
        return sorted(set(allowed[::-1][::stride]) | {allowed[0], full})

    def full_config(self):
        return {name: g.full for name, g in self.groups.items()}

    def _channels(self, op, config):
        c_in = op["full_in"] if op["in_group"] is None else config[op["in_group"]]
        if op["multiplier"]:
            return c_in, 0
        return c_in, op["full_out"] if op["out_group"] is None else config[op["out_group"]]

    def layers_ms(self, config):
        """The convs' and linears' share of ``config``'s latency (the table's sum)."""
        total = 0.0
        for op in self.ops:
            c_in, c_out = self._channels(op, config)
            total += op["calls"] * _bilinear(op["grid_in"], op["grid_out"], op["ms"], c_in, c_out)
        return total

    def elements(self, config):
        """Output values of the convs' and linears' calls at ``config`` (what norms and
        activations touch)."""
        total = 0
        for op in self.ops:
            c_in, c_out = self._channels(op, config)
            if op["kind"] == "linear":
                total += op["calls"] * op["rows"] * c_out
            else:
                channels = c_in * op["multiplier"] if op["multiplier"] else c_out
                total += op["calls"] * op["batch"] * channels * math.prod(op["out_size"])
        return total

    def rest_ms(self, config):
        """The part of ``config``'s latency outside the table's calls (the fitted line)."""
        return self.base_ms + self.ms_per_melement * self.elements(config) / 1e6

    def to_dict(self):
        """The table as JSON-ready data: the fitted rest, its fit points, the calls' grids."""
        return {"full_ms": self.full_ms, "base_ms": self.base_ms,
                "ms_per_melement": self.ms_per_melement, "fit": self.fit,
                "ops": [dict(op) for op in self.ops]}

    def _load(self, table):
        recorded = {_op_key(op) for op in self.ops}
        saved = {_op_key(op) for op in table.get("ops", [])}
        if saved != recorded:
            raise ValueError(
                f"The latency table holds {len(saved - recorded)} layer calls that the model "
                f"does not make and lacks {len(recorded - saved)} that it makes: it was "
                "measured on another architecture or input size; delete it to measure again.")
        self.ops = [dict(op) for op in table["ops"]]
        self.base_ms, self.ms_per_melement = float(table["base_ms"]), float(
            table["ms_per_melement"])
        self.fit = table.get("fit", [])
        self.full_ms = self(self.full_config())

    def __call__(self, config):
        return self.rest_ms(config) + self.layers_ms(config)


def _fit_line(xs, ys):
    """Least-squares ``(intercept, slope)`` of ``ys`` on ``xs``, the slope kept >= 0 (more
    output values never make the rest faster); a single point gives a slope of 0."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0 if spread == 0 else max(0.0, sum(
        (x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread)
    return mean_y - slope * mean_x, slope


def _op_key(op, with_groups=True):
    skip = {"grid_in", "grid_out", "ms", "calls"} | (set() if with_groups else
                                                      {"in_group", "out_group"})
    return json.dumps({k: v for k, v in op.items() if k not in skip}, sort_keys=True)


def _bilinear(xs, ys, values, x, y):
    """``values[i][j]`` at ``(xs[i], ys[j])``, interpolated at ``(x, y)`` (clamped at the edges)."""
    def bracket(points, v):
        if len(points) == 1 or v <= points[0]:
            return 0, 0, 0.0
        for k in range(len(points) - 1):
            if v <= points[k + 1]:
                return k, k + 1, (v - points[k]) / (points[k + 1] - points[k])
        return len(points) - 1, len(points) - 1, 0.0

    i0, i1, a = bracket(xs, x)
    j0, j1, b = bracket(ys, y)
    top = values[i0][j0] * (1 - b) + values[i0][j1] * b
    bottom = values[i1][j0] * (1 - b) + values[i1][j1] * b
    return top * (1 - a) + bottom * a


def _quiet_calibration(model, batches, config, num_images):
    # One calibration per candidate: its INFO line would drown the search's progress.
    log = logging.getLogger("slim_det.calibration")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        calibrate_norms(model, batches, [config], num_images)
    finally:
        log.setLevel(level)


def forget_configuration(model, config):
    """Delete the calibrated statistics that ``config`` left in every batch norm."""
    name = ChannelConfig(config).name
    for norm in switchable_norms(model):
        if name in norm.private:
            del norm.private[name]
            norm.calibrated.discard(name)


class _CalibratedScorer(abc.ABC):
    """Runs a candidate configuration, calibrated on some batches, then `measure` scores it; the
    candidate's statistics are deleted again afterwards."""

    def __init__(self, model, calibration_batches):
        self.model = model
        self.calibration_batches = calibration_batches
        self.num_calibration = sum(len(b) for b in calibration_batches)
        self.has_norms = bool(switchable_norms(model))

    @torch.no_grad()
    def __call__(self, config):
        config = set_channels(self.model, config)
        try:
            if self.has_norms:
                _quiet_calibration(self.model, self.calibration_batches, config,
                                   self.num_calibration)
            return self.measure(self.model)
        finally:
            forget_configuration(self.model, config)

    @abc.abstractmethod
    def measure(self, model):
        """The score of ``model`` as it runs now (the candidate, calibrated)."""


class LossScorer(_CalibratedScorer):
    """Scores a configuration by its detection loss on held-out images (higher is better).

    Each candidate's batch-norm statistics are calibrated on ``calibration_batches`` first, then
    the model computes its training losses on ``score_batches`` with those statistics (norms in
    eval mode, everything else in training mode, proposal sampling seeded so every candidate
    sees the same samples). The score is minus the mean total loss.

    Args:
        model (nn.Module): the slimmable detector (weights loaded).
        calibration_batches (list[list[dict]]): batches with test-time transforms.
        score_batches (list[list[dict]]): batches with annotations (``instances``).
        seed (int): seed of the proposal sampling.
    """

    def __init__(self, model, calibration_batches, score_batches, seed=0):
        super().__init__(model, calibration_batches)
        self.score_batches = score_batches
        self.seed = seed

    def measure(self, model):
        model.train()
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                module.eval()
        total = 0.0
        try:
            with torch.random.fork_rng(devices=[]), EventStorage():
                torch.manual_seed(self.seed)
                for batch in self.score_batches:
                    losses = model(batch)
                    total += float(sum(losses.values()))
        finally:
            model.eval()
        return -total / len(self.score_batches)


class APScorer(_CalibratedScorer):
    """Scores a configuration by COCO AP on held-out images (higher is better).

    Like `LossScorer`, each candidate is calibrated first; then the model runs inference on the
    images of ``dataset`` (a registered detectron2 dataset, e.g. held-out training images) and
    ``metric`` of the box results is the score (0 when nothing is detected).

    Args:
        model (nn.Module): the slimmable detector.
        calibration_batches (list[list[dict]]): batches with test-time transforms.
        loader (Iterable): the evaluation loader of ``dataset`` (test-time transforms).
        dataset (str): its registered name (for the COCO ground truth).
        metric (str): "AP" or "AP50" (COCOEvaluator's names).
        output_dir (str): where COCOEvaluator caches the dataset's COCO-format ground truth.
    """

    def __init__(self, model, calibration_batches, loader, dataset, metric="AP", output_dir=None):
        super().__init__(model, calibration_batches)
        self.loader = loader
        self.dataset = dataset
        self.metric = metric
        self.output_dir = output_dir

    def measure(self, model):
        from detectron2.evaluation import COCOEvaluator, inference_on_dataset

        model.eval()
        try:
            logging.getLogger("detectron2").disabled = True  # one evaluation per candidate
            results = inference_on_dataset(model, self.loader, COCOEvaluator(
                self.dataset, tasks=("bbox",), output_dir=self.output_dir))
        finally:
            logging.getLogger("detectron2").disabled = False
        value = results.get("bbox", {}).get(self.metric, 0.0)
        return 0.0 if not math.isfinite(value) else float(value)


def one_step_down(group, channels, step):
    """The group's next smaller allowed count, ``step`` x its full channels below ``channels``.

    Returns:
        int or None: the new count, or None if ``channels`` is already the group's smallest.
    """
    smaller = [c for c in group.allowed if c < channels]
    if not smaller:
        return None
    goal = channels - step * group.full
    fitting = [c for c in smaller if c <= goal + 1e-9]
    return fitting[-1] if fitting else smaller[0]


def _check_targets(targets, smallest, largest):
    targets = sorted({float(t) for t in targets}, reverse=True)
    if not targets:
        raise ValueError("Give at least one cost target (e.g. --target-gflops 1.5).")
    for target in targets:
        if not math.isfinite(target) or target < smallest:
            raise ValueError(f"Cost target {target:g} is unreachable: the smallest configuration "
                             f"costs {smallest:.4g} (every group at its fewest channels); full "
                             f"width costs {largest:.4g}.")
    return targets


def greedy_search(groups, cost, score, targets, step=1 / 12, state=None, on_round=None):
    """The AutoSlim greedy search.

    Args:
        groups (list[ChannelGroup]): the model's channel groups.
        cost (Callable[[dict], float]): cost of a configuration (e.g. `ConvCost`).
        score (Callable[[dict], float]): quality of a configuration, higher is better. If it has
            a ``many(configs) -> scores`` method (e.g. `ParallelScorer`), each round's candidates
            are scored through it at once.
        targets (Iterable[float]): costs at which to record the configuration.
        step (float): fraction of a group's full channels removed by one cut.
        state (dict): a state returned (or passed to ``on_round``) by an earlier call with the
            same arguments, to resume from; without a ``path``, extra keys to keep in a new one.
        on_round (Callable[[dict], None]): called with the state after every round.

    Returns:
        dict: ``path`` (one entry per round: channels, cost, score, cut group) and ``results``
        (target -> the first configuration at or below it, with its cost and score).

    Raises:
        ValueError: if a target is below the cost of the smallest configuration.
    """
    if not 0 < step <= 1:
        raise ValueError(f"The search step must be a fraction in (0, 1]; got {step!r}.")
    smallest = cost({g.name: g.allowed[0] for g in groups})
    full = {g.name: g.full for g in groups}
    targets = _check_targets(targets, smallest, cost(full))
    if not state or not state.get("path"):
        # A new search; keys the caller put in ``state`` (e.g. which images score) are kept.
        state = dict(state or {}, targets=targets, step=step, path=[], results={})
        start = time.perf_counter()
        state["path"].append({"channels": full, "cost": cost(full), "score": score(full),
                              "cut": None, "seconds": time.perf_counter() - start})
        _record(state, targets)
    elif state.get("targets") != targets or state.get("step") != step:
        raise ValueError(f"The saved search has targets {state.get('targets')} and step "
                         f"{state.get('step')}; this one {targets} and {step}. Use another "
                         "output folder, or the same arguments to resume.")
    by_name = {g.name: g for g in groups}
    while len(state["results"]) < len(targets):
        start = time.perf_counter()
        current = state["path"][-1]["channels"]
        cuts = []
        for name, group in by_name.items():
            smaller = one_step_down(group, current[name], step)
            if smaller is not None:
                cuts.append((name, dict(current, **{name: smaller})))
        if not cuts:
            break
        configs = [trial for _, trial in cuts]
        scores = score.many(configs) if hasattr(score, "many") else [score(c) for c in configs]
        trials = [(s, -cost(trial), name, trial) for s, (name, trial) in zip(scores, cuts)]
        best_score, minus_cost, cut, best = max(trials, key=lambda t: (t[0], t[1]))
        state["path"].append({"channels": best, "cost": -minus_cost, "score": best_score,
                              "cut": cut, "seconds": time.perf_counter() - start})
        _record(state, targets)
        if on_round is not None:
            on_round(state)
    return state


def _record(state, targets):
    last = state["path"][-1]
    for target in targets:
        key = f"{target:g}"
        if key not in state["results"] and last["cost"] <= target:
            state["results"][key] = dict(last)


def save_state(state, path):
    """Write the search state atomically (a crash never leaves half a file)."""
    if not comm.is_main_process():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_state(path):
    """Read a saved search state, or None if ``path`` does not exist."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"Search state {path!r} is not valid JSON ({e}); delete it to start "
                         "over.") from None
    state["targets"] = [float(t) for t in state["targets"]]
    return state


def eta_seconds(state):
    """Seconds until the lowest target: the mean round time x the rounds that the mean cost drop
    per round needs to reach it. None before the first round."""
    rounds = state["path"][1:]
    if not rounds:
        return None
    drop = (state["path"][0]["cost"] - rounds[-1]["cost"]) / len(rounds)
    left = max(0.0, rounds[-1]["cost"] - min(state["targets"]))
    per_round = sum(r["seconds"] for r in rounds) / len(rounds)
    return per_round * (left / drop if drop > 0 else 0.0)
