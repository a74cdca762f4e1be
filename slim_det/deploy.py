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
"""
import torch

from .analysis import latency_ms
from .calibration import widths_with_statistics, widths_without_statistics
from .layers import SwitchableNorm
from .width import check_width, using_width

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
        timer (callable or None): ``timer(width) -> milliseconds`` replacing the real benchmark
            (for tests or custom timing).
    """

    def __init__(self, model, widths=None, image_size=(512, 512), inputs=None, warmup=2,
                 repeats=5, timer=None):
        self.model = model
        if widths is None:
            widths = widths_with_statistics(model)
            if widths is None:
                raise ValueError(
                    f"{type(model).__name__} has no switchable norm to read its widths from; pass "
                    "widths explicitly, e.g. widths=slim_det.deploy.width_grid(0.25, 1.0)."
                )
        self.widths = sorted(check_width(w) for w in widths)
        if not self.widths:
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
        self.warmup, self.repeats = warmup, repeats
        self._timer = timer or self._time_width
        self.latencies = {}

    def _time_width(self, width):
        with using_width(self.model, width):
            return latency_ms(self.model, self.inputs, self.warmup, self.repeats)

    def measure(self):
        """Benchmark every width now, replacing earlier measurements.

        Returns:
            dict[float, float]: median milliseconds per width.
        """
        self.latencies = {width: float(self._timer(width)) for width in self.widths}
        return dict(self.latencies)

    def select(self, budget_ms):
        """The widest width meeting ``budget_ms``, measuring first if nothing was measured.

        Raises:
            NoWidthFitsError: if no width is fast enough.
        """
        if not self.latencies:
            self.measure()
        return select_width(self.latencies, budget_ms)
