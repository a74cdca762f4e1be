"""Loud divergence: warn when one width's loss spikes or its box classifier collapses."""
import logging
import statistics

from detectron2.engine import HookBase

__all__ = ["DivergenceMonitor"]


class DivergenceMonitor(HookBase):
    """Watches each width's logged losses after every step and warns, naming width and iteration.

    Two failure shapes are caught, each warned once per episode (again only after recovering):

    * **Spike**: a width's total loss exceeds ``spike_factor`` x its median over the previous
      ``window`` iterations.
    * **Classifier not learning**: from ``check_after`` on, over the last ``window`` iterations,
      a width's box classifier either has a median ``loss_cls`` no lower than over its first
      ``window`` iterations, or calls nearly every foreground ROI background (median
      ``fast_rcnn/fg_cls_accuracy`` below ``min_fg_accuracy``) *after* it had spiked or had
      already classified foreground (median accuracy once above ``learned_fg_accuracy``). The
      second test matters: a classifier that collapsed to the class prior has a *lower* loss than
      the uniform guess it started from, yet has stopped detecting anything. A healthy run also
      calls everything background for its first 100-150 iterations here, hence the condition.

    A non-finite loss is not handled here: the training step raises `FloatingPointError`.
    """

    def __init__(self, widths, window=20, spike_factor=3.0, check_after=0, min_fg_accuracy=0.02,
                 learned_fg_accuracy=0.1, prefix="w"):
        """
        Args:
            widths (list[str]): the width labels that prefix the metrics (``"1"`` for ``w1/...``).
            window (int): iterations in each median.
            spike_factor (float): how many times its recent median a loss may reach.
            check_after (int): first iteration of the collapse check (well after warm-up).
            min_fg_accuracy (float): a median foreground accuracy below this is a collapse...
            learned_fg_accuracy (float): ...once the median had been above this.
            prefix (str): what precedes a label in the metric names ("" for the sandwich rule's
                ``max/...``, ``min/...``).
        """
        self._widths = list(widths)
        self._prefix = prefix
        self._window = window
        self._spike_factor = spike_factor
        self._check_after = check_after
        self._min_fg_accuracy = min_fg_accuracy
        self._learned_fg_accuracy = learned_fg_accuracy
        self._warned = set()
        self._first_spike = {}  # width label -> iteration
        self._best_fg_accuracy = {}  # width label -> highest median seen
        self._logger = logging.getLogger(__name__)

    def _values(self, name, first=None, last=None):
        """Logged values of ``name``: the first ``first`` or the last ``last`` of them."""
        storage = self.trainer.storage
        if name not in storage.histories():
            return []
        data = storage.history(name).values()  # the buffer's own list: slice, never copy all
        data = data[:first] if first is not None else data[-last:] if last else data
        return [value for value, _ in data]

    def _count(self, name):
        histories = self.trainer.storage.histories()
        return len(histories[name].values()) if name in histories else 0

    def _warn_once(self, key, active, message):
        if active and key not in self._warned:
            self._warned.add(key)
            self._logger.warning(message)
        elif not active:
            self._warned.discard(key)

    def after_step(self):
        iteration = self.trainer.iter
        for label in self._widths:
            self._check_spike(label, iteration)
            if iteration >= self._check_after:
                self._check_collapse(label, iteration)

    def _total_losses(self, label, last):
        start = f"{self._prefix}{label}/loss_"
        names = [n for n in self.trainer.storage.histories() if n.startswith(start)]
        columns = [self._values(n, last=last) for n in names]
        length = min((len(c) for c in columns), default=0)
        return [sum(c[len(c) - length + i] for c in columns) for i in range(length)]

    def _check_spike(self, label, iteration):
        totals = self._total_losses(label, last=self._window + 1)
        if len(totals) <= self._window:
            return
        median = statistics.median(totals[-self._window - 1:-1])
        current = totals[-1]
        spiked = current > self._spike_factor * median
        if spiked:
            self._first_spike.setdefault(label, iteration)
        self._warn_once(
            ("spike", label),
            spiked,
            f"Loss spike at width {label}, iteration {iteration}: total loss {current:.3g} is "
            f"{current / median:.1f}x its median {median:.3g} over the previous {self._window} "
            "iterations. If it does not come back down, training at this width has diverged "
            "(see docs/experiments/stability.md).",
        )

    def _check_collapse(self, label, iteration):
        name = f"{self._prefix}{label}/loss_cls"
        if self._count(name) < 2 * self._window:
            return
        start = statistics.median(self._values(name, first=self._window))
        recent = statistics.median(self._values(name, last=self._window))
        accuracies = self._values(
            f"{self._prefix}{label}/fast_rcnn/fg_cls_accuracy", last=self._window
        )
        reasons = []
        if recent >= start:
            reasons.append(
                f"median loss_cls {recent:.3g} over the last {self._window} iterations is no "
                f"lower than {start:.3g} over the first {self._window}"
            )
        if len(accuracies) >= self._window:
            accuracy = statistics.median(accuracies)
            best = max(accuracy, self._best_fg_accuracy.get(label, 0.0))
            self._best_fg_accuracy[label] = best
            if accuracy < self._min_fg_accuracy and best > self._learned_fg_accuracy:
                reasons.append(
                    f"it classifies {accuracy:.1%} of foreground ROIs correctly (median of the "
                    f"last {self._window} iterations; it had reached {best:.1%}): it calls "
                    "nearly every object background again"
                )
            elif accuracy < self._min_fg_accuracy and label in self._first_spike:
                reasons.append(
                    f"it classifies {accuracy:.1%} of foreground ROIs correctly (median of the "
                    f"last {self._window} iterations) since its loss spiked at iteration "
                    f"{self._first_spike[label]}: it calls nearly every object background"
                )
        self._warn_once(
            ("collapse", label),
            bool(reasons),
            f"The box classifier at width {label} has not learned by iteration {iteration}: "
            + "; ".join(reasons) + ".",
        )
