"""Choose a width at runtime: the widest one that meets a latency budget on this device.

Example::

    selector = WidthSelector(model, widths=[0.25, 0.5, 0.75, 1.0], image_size=(800, 1216))
    selector.measure()                  # benchmarks every width once (warm-up, then median)
    slim_det.set_width(model, selector.select(budget_ms=150))
    ...
    selector.measure()                  # re-measure when the device gets busier or freer

A universally slimmable model runs any width of its range once that width is calibrated: calibrate
a grid (``tools/calibrate.py --widths $(seq 0.25 0.05 1)``, or `slim_det.calibrate_norms` with
``width_grid(0.25, 1.0)``) and the selector measures every calibrated width by default.

Searched channel configurations (tools/autoslim.py) are chosen among like widths::

    selector = WidthSelector(model, configurations={"searched_1.5": "out/gflops_1.5.json"})
    choice = selector.select(budget_ms=40)   # a width (float) or a configuration's label
    selector.apply(choice)                   # set_width or set_channels
"""
from collections.abc import Mapping

import torch

from .analysis import latency_ms
from .calibration import widths_with_statistics, widths_without_statistics
from .channels import ChannelConfig, apply_setting, current_setting, load_channels, set_channels
from .layers import SwitchableNorm
from .width import check_width, set_width

__all__ = ["NoWidthFitsError", "select_width", "trained_widths", "width_grid", "WidthSelector"]


class NoWidthFitsError(ValueError):
    """No measured width meets the latency budget."""


def select_width(latencies, budget_ms):
    """The widest width whose latency is within ``budget_ms``.

    Args:
        latencies (dict[float, float]): milliseconds per width.
        budget_ms (float): the latency budget.

    Returns:
        float: the chosen width.

    Raises:
        NoWidthFitsError: if every width is slower than the budget; names the budget and the
            fastest width.
        ValueError: if ``latencies`` is empty.
    """
    if not latencies:
        raise ValueError("No latency measured yet: call WidthSelector.measure() first.")
    fitting = [w for w, ms in latencies.items() if ms <= budget_ms]
    if fitting:
        return max(fitting)
    fastest = min(latencies, key=latencies.get)
    raise NoWidthFitsError(
        f"No width meets the latency budget of {budget_ms:g} ms: the fastest measured width, "
        f"{fastest:g}, takes {latencies[fastest]:.1f} ms. Raise the budget, use smaller "
        "images, or train a narrower width."
    )


def trained_widths(model):
    """The widths ``model``'s switchable norms hold statistics for, ascending."""
    for module in model.modules():
        if isinstance(module, SwitchableNorm):
            return sorted(module.widths)
    raise ValueError(
        f"{type(model).__name__} has no switchable norm to read its trained widths from; pass "
        "widths explicitly."
    )


def width_grid(low, high=1.0, step=0.05):
    """Widths from ``low`` to ``high`` (both included) every ``step``, ascending, e.g. the grid a
    universally slimmable model is calibrated and measured on."""
    low, high = check_width(low), check_width(high)
    if not (step > 0 and low <= high):
        raise ValueError(f"width_grid needs low <= high and step > 0; got low {low:g}, high "
                         f"{high:g}, step {step!r}.")
    count = int(round((high - low) / step + 1e-9))
    grid = [round(low + i * step, 6) for i in range(count + 1) if low + i * step <= high + 1e-9]
    return sorted(set(grid) | {high})


def _random_inputs(model, image_size):
    height, width = image_size
    # Pixel values in the usual 0-255 range, so preprocessing and activations are realistic.
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8).float()
    return [{"image": image, "height": height, "width": width}]


class WidthSelector:
    """Benchmarks each width of a slim model on the current device and picks one for a budget.

    Args:
        model (nn.Module): a slim detectron2 model, on the device it will run on.
        widths (Iterable[float] or None): candidate widths, each with batch-norm statistics in
            ``model``; default: every width that has them (the trained widths of a switchable
            model, plus any calibrated one; the calibrated widths of a universal model).
        image_size (tuple[int, int]): (height, width) of the benchmark image, as the model gets it
            (after resizing); ignored when ``inputs`` is given.
        inputs (list[dict] or None): detectron2 inputs to time; real images give the most faithful
            timings (random images usually produce fewer detections than real ones).
        warmup (int): untimed runs per width.
        repeats (int): timed runs per width; the median is kept.
        timer (callable or None): ``timer(choice) -> milliseconds`` replacing the real benchmark
            (for tests or custom timing); a choice is a width or a configuration's label.
        configurations (dict[str, Mapping | str] or None): searched channel configurations
            (group -> channels, or the path of a JSON file from tools/autoslim.py) by label, each
            calibrated in ``model``. They compete with the widths; among the choices within a
            budget the one with the most multiply-adds wins (`slim_det.autoslim.ConvCost`).
    """

    def __init__(self, model, widths=None, image_size=(512, 512), inputs=None, warmup=2,
                 repeats=5, timer=None, configurations=None):
        self.model = model
        self.configurations = {}
        for label, config in (configurations or {}).items():
            config = load_channels(config) if isinstance(config, str) else config
            if not isinstance(config, Mapping):
                raise ValueError(f"Configuration {label!r} must be a mapping or a JSON path; "
                                 f"got {type(config).__name__}.")
            self.configurations[str(label)] = _calibrated(model, label, config)
        if configurations and widths is None:
            widths = []
        if widths is None:
            widths = widths_with_statistics(model)
            if widths is None:
                raise ValueError(
                    f"{type(model).__name__} has no switchable norm to read its widths from; pass "
                    "widths explicitly, e.g. widths=slim_det.deploy.width_grid(0.25, 1.0)."
                )
        self.widths = sorted(check_width(w) for w in widths)
        if not self.widths and not self.configurations:
            raise ValueError(
                "WidthSelector needs at least one width; this model has statistics at none (a "
                "universally slimmable model needs its widths calibrated first, e.g. "
                "tools/calibrate.py --widths $(seq 0.25 0.05 1)).")
        missing = widths_without_statistics(model, self.widths)
        if missing:
            raise ValueError(
                f"Widths {missing} have no batch-norm statistics in this model, so they cannot "
                "run: calibrate them first (slim_det.calibrate_norms, tools/calibrate.py) or "
                f"choose among {widths_with_statistics(model)}.")
        self.inputs = inputs if inputs is not None else _random_inputs(model, image_size)
        self.image_size = image_size
        self.warmup, self.repeats = warmup, repeats
        self._timer = timer or self._time_choice
        self.latencies = {}
        self._sizes = None

    @property
    def choices(self):
        """The widths, then the configurations' labels."""
        return list(self.widths) + list(self.configurations)

    def apply(self, choice):
        """Run ``model`` at a choice: a width (`set_width`) or a configuration's label."""
        if isinstance(choice, str):
            set_channels(self.model, self.configurations[choice])
        else:
            set_width(self.model, choice)

    def _time_choice(self, choice):
        previous = current_setting(self.model)
        self.apply(choice)
        try:
            return latency_ms(self.model, self.inputs, self.warmup, self.repeats)
        finally:
            apply_setting(self.model, previous)

    def measure(self):
        """Benchmark every choice now, replacing earlier measurements.

        Returns:
            dict: median milliseconds per width (and per configuration label).
        """
        self.latencies = {choice: float(self._timer(choice)) for choice in self.choices}
        return dict(self.latencies)

    def sizes(self):
        """Multiply-adds per choice (the order in which a larger choice wins a budget)."""
        if self._sizes is None:
            from .autoslim import ConvCost  # autoslim imports calibration, as we do
            from .channels import uniform_channels

            image = self.inputs[0]["image"]
            heads = self.model.roi_heads
            cost = ConvCost(self.model, tuple(image.shape[-2:]),
                            self.model.proposal_generator.post_nms_topk[False],
                            heads.box_predictor.test_topk_per_image)
            self._sizes = {w: cost(uniform_channels(self.model, w)) for w in self.widths}
            self._sizes.update({k: cost(c) for k, c in self.configurations.items()})
        return self._sizes

    def select(self, budget_ms):
        """The largest choice meeting ``budget_ms``, measuring first if nothing was measured:
        the widest width, or with configurations the choice of most multiply-adds.

        Raises:
            NoWidthFitsError: if nothing is fast enough.
        """
        if not self.latencies:
            self.measure()
        if not self.configurations:
            return select_width(self.latencies, budget_ms)
        fitting = [c for c, ms in self.latencies.items() if ms <= budget_ms]
        if not fitting:
            fastest = min(self.latencies, key=self.latencies.get)
            raise NoWidthFitsError(
                f"No width or configuration meets the latency budget of {budget_ms:g} ms: the "
                f"fastest, {fastest}, takes {self.latencies[fastest]:.1f} ms.")
        sizes = self.sizes()
        return max(fitting, key=lambda c: sizes[c])


def _calibrated(model, label, config):
    previous = current_setting(model)
    config = ChannelConfig(set_channels(model, config))
    try:
        norms = [n for n in model.modules() if isinstance(n, SwitchableNorm)]
        if norms and any(config.name not in n.private for n in norms):
            raise ValueError(
                f"Configuration {label!r} ({config.name}) has no calibrated batch-norm "
                "statistics in this model: calibrate it first (slim_det.calibrate_norms(model, "
                "loader, [config], n)).")
    finally:
        apply_setting(model, previous)
    return config
