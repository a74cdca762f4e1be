"""The width: one concept, one entry point.

A width is a float in (0, 1]: the fraction of every slimmable layer's channels that is active.
`set_width` is the only way to change it; each slimmable layer reads its own ``width`` attribute
and derives its active channel count from it with `active_channels`.
"""
import contextlib
import functools
import math

import torch.nn as nn

__all__ = [
    "SlimModule",
    "FollowsWidth",
    "make_divisible",
    "active_channels",
    "check_width",
    "width_key",
    "set_width",
    "get_width",
    "using_width",
]


class SlimModule:
    """Mixin marking a module whose active channels follow ``self.width``.

    `set_width` finds layers through this class, so a layer that does not inherit it never slims.
    """

    width = 1.0
    divisor = 8
    expansion = 1  # see active_channels
    # A channel configuration (slim_det.set_channels) overrides the width: the layer's output
    # channel count, and the name of the configuration (its norms' private statistics).
    channels = None
    config_name = None


class FollowsWidth:
    """Mixin marking a module whose behaviour, not its channels, follows the width.

    `set_width` sets its ``width`` as it does a slimmable layer's (e.g. `slim_det.SlimRPN` keeps
    fewer proposals at narrow widths); it has no channels, so channel groups, tracing, freezing and
    `get_width` pass it by. A channel configuration runs it at width 1.
    """

    width = 1.0


def make_divisible(value, divisor=8, min_value=None):
    """Round ``value`` to the nearest multiple of ``divisor``, never below 90% of ``value``.

    This is the rounding rule of the US-Nets / MobileNet papers. It keeps channel counts friendly to
    vectorized kernels while staying close to the requested fraction.

    Args:
        value (float): the unrounded channel count, e.g. ``channels * width``.
        divisor (int): the multiple to round to.
        min_value (int): lower bound of the result; defaults to ``divisor``.

    Returns:
        int: the rounded channel count.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@functools.lru_cache(maxsize=4096)  # called by every slimmable layer on every forward
def active_channels(channels, width, divisor=8, expansion=1):
    """The number of channels a layer of ``channels`` channels uses at ``width``.

    Width 1.0 always gives ``channels`` exactly, so the full-width model is the stock model. The
    result is at least 1 and never more than ``channels``.

    Args:
        expansion (int): for an expanded layer (MobileNet v2's inverted residual), ``channels`` is
            ``expansion`` times a base width; the base is rounded, then expanded, as the authors do.
    """
    if width >= 1.0:
        return channels
    if expansion > 1:
        return active_channels(channels // expansion, width, divisor) * expansion
    return max(1, min(channels, make_divisible(channels * width, divisor)))


def check_width(width):
    """Validate a width value and return it as a float.

    Raises:
        ValueError: if ``width`` is not a finite number in (0, 1].
    """
    try:
        value = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"A width must be a number in (0, 1]; got {width!r}.") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"A width must be a number in (0, 1]; got {width!r}.")
    return value


def width_key(width):
    """A stable name for a width, usable as a module name and a metric prefix (0.25 -> "0.25")."""
    return f"{float(width):g}"


def _slim_modules(model):
    # DDP, DataParallel and any other wrapper expose the wrapped layers through modules().
    return [m for m in model.modules() if isinstance(m, SlimModule)]


def set_width(model, width):
    """Set the active width of every slimmable layer in ``model``.

    Args:
        model (nn.Module): a model containing slimmable layers, possibly wrapped in
            DistributedDataParallel.
        width (float): the width in (0, 1].

    Raises:
        ValueError: if ``width`` is out of range or ``model`` has no slimmable layer.
    """
    width = check_width(width)
    layers = _slim_modules(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no slimmable layer; build it with a slim_det backbone "
            "(e.g. MODEL.BACKBONE.NAME: build_slim_resnet_fpn_backbone)."
        )
    for layer in layers:
        layer.width = width
        layer.channels = None
        layer.config_name = None
    for module in model.modules():
        if isinstance(module, FollowsWidth):
            module.width = width


def get_width(model):
    """Return the width the slimmable layers of ``model`` run at.

    Raises:
        ValueError: if ``model`` has no slimmable layer, or its layers disagree (set them with
            `set_width`).
    """
    layers = _slim_modules(model)
    widths = {layer.width for layer in layers}
    if not widths:
        raise ValueError(f"{type(model).__name__} has no slimmable layer.")
    configurations = {layer.config_name for layer in layers} - {None}
    if configurations:
        raise ValueError(
            f"{type(model).__name__} runs channel configuration {sorted(configurations)[0]}, not "
            "a uniform width: read it with slim_det.get_channels(model), or set a width with "
            "slim_det.set_width(model, w)."
        )
    if len(widths) > 1:
        raise ValueError(
            f"The slimmable layers of {type(model).__name__} run at different widths "
            f"{sorted(widths)}; use slim_det.set_width(model, w) to set one width."
        )
    return widths.pop()


@contextlib.contextmanager
def using_width(model, width):
    """Run a block at ``width``, then restore the width the model had before.

    Example::

        with slim_det.using_width(model, 0.5):
            outputs = model(inputs)
    """
    previous = get_width(model)
    set_width(model, width)
    try:
        yield model
    finally:
        set_width(model, previous)


def is_slimmable(model):
    """Whether ``model`` contains any slimmable layer."""
    return isinstance(model, nn.Module) and bool(_slim_modules(model))
