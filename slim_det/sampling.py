"""Which widths train in each iteration: a fixed list (S-Nets) or the sandwich rule (US-Nets).

A width schedule is any object with ``widths_for(iteration) -> list[(label, setting)]``, widest
first, where a setting is a width or a channel configuration (`slim_det.channels.ChannelConfig`,
sampled per group by `SandwichChannels`). `SlimSimpleTrainer` trains the listed widths on the iteration's batch and logs each width's
losses under its label (losses of widths sharing a label are summed, so ``total_loss`` stays the
sum over every trained width).
"""
import logging
import random

from detectron2.utils import comm

from .channels import ChannelConfig, channel_groups
from .config import is_universal, slim_settings, train_widths, width_range
from .layers import SlimConv2d, SlimLinear
from .width import active_channels, check_width, width_key

__all__ = ["FixedWidths", "SandwichWidths", "SandwichChannels", "build_width_schedule",
           "reference_channels"]


class FixedWidths:
    """The same widths every iteration (S-Nets Algorithm 1), labelled ``w0.25`` etc."""

    def __init__(self, widths):
        self.widths = sorted((check_width(w) for w in widths), reverse=True)
        if not self.widths:
            raise ValueError("FixedWidths needs at least one width; got [].")

    def widths_for(self, iteration):
        return [(f"w{width_key(w)}", w) for w in self.widths]


class SandwichWidths:
    """The sandwich rule: the max width, the min width and ``num_sampled - 2`` random widths.

    The random widths are uniform in [min, max], drawn by a generator seeded from (seed,
    iteration) alone: every process draws the same widths without communicating, and a resumed
    run draws what the uninterrupted run drew. The global random generators are never touched.

    Rounding: a width runs ``make_divisible(c * w, divisor)`` channels, so nearby widths can run
    the same network. A random width is redrawn (up to ``max_redraws`` times) while it gives the
    same channel count as a width already chosen this iteration in the reference layer, the
    model's widest slimmable layer (its count distinguishes the most widths); if the range holds
    too few distinct counts, the last draw is kept. Labels: "max", "min", "rand".
    """

    def __init__(self, width_range, num_sampled=4, seed=0, channels=None, divisor=8,
                 max_redraws=100):
        """
        Args:
            width_range (tuple[float, float]): (min, max) widths, 0 < min < max <= 1.
            num_sampled (int): widths per iteration, >= 2.
            seed (int): the schedule's seed (the same on every process).
            channels (int or None): full channel count of the reference layer; None: widths only
                need to differ as numbers.
            divisor (int): channel rounding divisor (MODEL.SLIM.DIVISOR).
        """
        low, high = check_width(width_range[0]), check_width(width_range[1])
        if low >= high:
            raise ValueError(f"width_range must be (min, max) with min < max; got {width_range}.")
        if not isinstance(num_sampled, int) or num_sampled < 2:
            raise ValueError(f"num_sampled must be an integer >= 2; got {num_sampled!r}.")
        self.low, self.high, self.num_sampled = low, high, num_sampled
        self.seed, self.channels, self.divisor = int(seed), channels, divisor
        self.max_redraws = max_redraws

    def _key(self, width):
        if self.channels is None:
            return width
        return active_channels(self.channels, width, self.divisor)

    def widths_for(self, iteration):
        rng = random.Random(self.seed * 2**32 + int(iteration))  # local: a pure function
        chosen = [("max", self.high), ("min", self.low)]
        taken = {self._key(self.high), self._key(self.low)}
        for _ in range(self.num_sampled - 2):
            for _ in range(self.max_redraws):
                width = rng.uniform(self.low, self.high)
                if self._key(width) not in taken and width not in (self.low, self.high):
                    break
            taken.add(self._key(width))
            chosen.append(("rand", width))
        return sorted(chosen, key=lambda item: -item[1])


class SandwichChannels(SandwichWidths):
    """The sandwich rule with non-uniform random members (MODEL.SLIM.SAMPLING "per_group").

    Each iteration trains the max and the min width, uniform, and ``num_sampled - 2`` channel
    configurations in which every channel group draws its own width uniform in [min, max] (its
    count is the one that width gives the group under `set_width`). A channel search scores such
    non-uniform networks; a supernet trained only on uniform widths never ran them. Draws are a
    pure function of (seed, iteration), as in `SandwichWidths`. Labels: "max", "rand", "min".
    """

    def __init__(self, width_range, groups, num_sampled=4, seed=0):
        """
        Args:
            width_range (tuple[float, float]): (min, max) widths, 0 < min < max <= 1.
            groups (list[ChannelGroup]): the model's channel groups (`channel_groups`).
            num_sampled (int): members per iteration, >= 2.
            seed (int): the schedule's seed (the same on every process).
        """
        super().__init__(width_range, num_sampled, seed)
        if not groups:
            raise ValueError("SandwichChannels needs the model's channel groups; got none.")
        self.groups = list(groups)

    def widths_for(self, iteration):
        rng = random.Random(self.seed * 2**32 + int(iteration))
        configs = [ChannelConfig({g.name: g.channels_at(rng.uniform(self.low, self.high))
                                  for g in self.groups})
                   for _ in range(self.num_sampled - 2)]
        return [("max", self.high)] + [("rand", c) for c in configs] + [("min", self.low)]


def reference_channels(model):
    """The full output channel count of ``model``'s widest slimming conv / linear layer."""
    counts = [getattr(m, "out_channels", getattr(m, "out_features", 0))
              for m in getattr(model, "module", model).modules()
              if isinstance(m, (SlimConv2d, SlimLinear)) and m.slim_out]
    return max(counts) if counts else None


def build_width_schedule(cfg, model, seed=None):
    """The width schedule of ``cfg``: `FixedWidths` (switchable) or `SandwichWidths` (universal).

    Args:
        seed (int or None): the sandwich seed; None: cfg.SEED if >= 0, else one random seed
            shared by all processes (then a resumed run does not redraw the same widths).
    """
    _, _, divisor = slim_settings(cfg)
    if not is_universal(cfg):
        return FixedWidths(train_widths(cfg))
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    if cfg.MODEL.SLIM.SAMPLING == "per_group":
        schedule = SandwichChannels(width_range(cfg), channel_groups(model),
                                    cfg.MODEL.SLIM.NUM_SAMPLED, seed)
        between = (f"{schedule.num_sampled - 2} channel configurations in between, each of its "
                   f"{len(schedule.groups)} channel groups at its own random width")
    else:
        schedule = SandwichWidths(width_range(cfg), cfg.MODEL.SLIM.NUM_SAMPLED, seed,
                                  reference_channels(model), divisor)
        between = f"{schedule.num_sampled - 2} uniform in between"
    logging.getLogger(__name__).info(
        f"Universal mode: each iteration trains widths {schedule.high:g}, {schedule.low:g} and "
        f"{between} (sandwich rule, seed {seed}).")
    return schedule
