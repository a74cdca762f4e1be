"""Slimmable layers and switchable norms.

Every slimmable layer keeps the full-width parameters of the stock layer it replaces, under the
stock names, and uses a leading slice of them at the active width:

- output channels: ``active_channels(out_channels, width, divisor)`` unless the layer is marked to
  keep its output full (predictors, and every layer outside the slimmed scope);
- input channels: whatever the incoming tensor has, so a layer always consumes exactly what the
  previous layer produced. Slicing an input is the same as zero-padding it back to full width.

Layers are made slimmable *in place* by `make_slimmable_`, which swaps the class of a built stock
module. Parameters, ``requires_grad`` flags (frozen stages), initialisation and any outside
references (detectron2's FPN keeps its convs in plain lists) all stay valid, and width 1.0 runs
exactly the stock computation.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d

from .width import SlimModule, active_channels, width_key

__all__ = [
    "SlimConv2d",
    "SlimConvTranspose2d",
    "SlimLinear",
    "SlimGroupNorm",
    "SwitchableNorm",
    "switchable_norm_class",
    "private_norm_name",
    "width_of_private_name",
    "make_slimmable_",
]


def _check_input(layer, in_channels, full):
    if in_channels > full:
        raise ValueError(
            f"{type(layer).__name__} has {full} input channels at full width but received "
            f"{in_channels}; its input comes from a wider layer than it was built for."
        )


class _SlimOut(SlimModule):
    """Shared output-channel rule of slimmable convs and linears."""

    slim_out = True  # False: the output stays full width (predictors, unslimmed scope)
    min_width = 0.0  # the output never narrows below this width (MODEL.SLIM.FPN_MIN_WIDTH)

    def active_out(self, full):
        if not self.slim_out:
            return full
        if self.channels is not None:  # a channel configuration (slim_det.set_channels)
            return self.channels
        return active_channels(full, max(self.width, self.min_width), self.divisor, self.expansion)


# Where a conv keeps its contiguous weight slice between inference calls (see _inference_weight).
CACHED_WEIGHT = "_cached_weight_slice"


def _inference_weight(layer, rows, cols):
    """``layer.weight[:rows, :cols]`` in the form the conv kernel should get.

    The whole weight is passed as it is. A slice that drops input channels is not contiguous, and
    both CPU conv kernels (oneDNN and the native one) then copy it on every call, which costs
    narrow widths a few percent of their conv time. In inference (eval mode, no gradient) a
    contiguous copy is therefore kept and reused while it is still right: same slice, and the
    same weight tensor (``data_ptr``: a ``.to()`` or a load with ``assign``) with no in-place
    change since (its version counter: optimizer steps, ``load_state_dict``, ``torch.nn.init``).
    It is looked up before anything is sliced, so a reused copy costs no tensor op at all (a
    slice costs about as much as a small conv's own Python). Writes through ``weight.data`` bypass
    the version counter; call ``layer.train()`` (which drops the copy) after them. The copy holds
    the same values, so outputs are bit for bit those of the slice. In training, or with
    gradients on, the slice itself is used (autograd needs it) and no copy is kept; so it is under
    tracing and compilation, which should see the weight sliced, not a constant.
    """
    full = layer.weight
    if _tracing():
        return full[:rows, :cols]
    if rows == full.shape[0] and cols == full.shape[1]:
        return full
    if layer.training or torch.is_grad_enabled() or full.is_inference():  # no version counter
        return full[:rows, :cols]
    key = (rows, cols, full.data_ptr(), full._version, full.dtype, full.device)
    cached = layer.__dict__.get(CACHED_WEIGHT)
    if cached is None or cached[0] != key:
        weight = full[:rows, :cols]
        cached = (key, weight if cols == full.shape[1] else weight.contiguous())
        layer.__dict__[CACHED_WEIGHT] = cached
    return cached[1]


def _tracing():
    # A traced or compiled graph records the slices (they follow later weight changes); shape
    # comparisons would be frozen into it.
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _bias(layer, out):
    bias = layer.bias
    if bias is None or (not _tracing() and out == bias.shape[0]):
        return bias
    return bias[:out]


class _CachesInferenceWeight:
    """Drops the cached inference weight (`_inference_weight`) when the layer goes to training."""

    def train(self, mode=True):
        self.__dict__.pop(CACHED_WEIGHT, None)
        return super().train(mode)


class SlimConv2d(_CachesInferenceWeight, _SlimOut, Conv2d):
    """A detectron2 `Conv2d` (with its norm and activation) that runs on a slice of its channels.

    A depthwise conv (``groups == in_channels``) follows its input: groups and output channels
    shrink with the incoming tensor.
    """

    @property
    def is_depthwise(self):
        return self.groups > 1 and self.groups == self.in_channels

    def active_shape(self, in_channels):
        """(out_channels, in_channels_per_group, groups) used for an input of ``in_channels``."""
        _check_input(self, in_channels, self.in_channels)
        if self.is_depthwise:
            multiplier = self.out_channels // self.in_channels
            return in_channels * multiplier, 1, in_channels
        return self.active_out(self.out_channels), in_channels, 1

    def forward(self, x):
        out, in_per_group, groups = self.active_shape(x.shape[1])
        weight = _inference_weight(self, out, in_per_group)
        x = F.conv2d(x, weight, _bias(self, out), self.stride, self.padding, self.dilation, groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class SlimConvTranspose2d(_CachesInferenceWeight, _SlimOut, nn.ConvTranspose2d):
    """An `nn.ConvTranspose2d` (weight layout: in, out, kh, kw) on a slice of its channels."""

    def forward(self, x):
        _check_input(self, x.shape[1], self.in_channels)
        out = self.active_out(self.out_channels)
        weight = _inference_weight(self, x.shape[1], out)
        return F.conv_transpose2d(
            x, weight, _bias(self, out), self.stride, self.padding, self.output_padding, 1,
            self.dilation
        )


class SlimLinear(_SlimOut, nn.Linear):
    """An `nn.Linear` on a slice of its features.

    A linear layer after a flatten of (C, H, W) features sees channel-major inputs, so the first
    ``C' * H * W`` input features are exactly those of the first ``C'`` channels.
    """

    def forward(self, x):
        _check_input(self, x.shape[-1], self.in_features)
        out = self.active_out(self.out_features)
        weight = self.weight
        if _tracing() or weight.shape != (out, x.shape[-1]):
            weight = weight[:out, : x.shape[-1]]
        return F.linear(x, weight, _bias(self, out))


class SlimGroupNorm(SlimModule, nn.GroupNorm):
    """GroupNorm valid at every width: it keeps the channels per group of the full layer.

    At full width it is the stock GroupNorm. When the active channels are not a multiple of the
    group size, it falls back to the largest group count dividing them.
    """

    def groups_for(self, channels):
        per_group = self.num_channels // self.num_groups
        if channels % per_group == 0:
            return channels // per_group
        return math.gcd(channels, self.num_groups)

    def forward(self, x):
        channels = x.shape[1]
        _check_input(self, channels, self.num_channels)
        if channels == self.num_channels:
            return super().forward(x)
        weight = self.weight[:channels] if self.affine else None
        bias = self.bias[:channels] if self.affine else None
        return F.group_norm(x, self.groups_for(channels), weight, bias, self.eps)


@functools.lru_cache(maxsize=1024)  # called by every norm on every forward
def private_norm_name(width):
    """The module name of a width's private norm: "w0_25" for 0.25 (names cannot contain ".")."""
    return "w" + width_key(width).replace(".", "_")


def private_norm_width(name):
    """The width of a private norm's module name: 0.25 for "w0_25" (see `private_norm_name`)."""
    return float(name[1:].replace("_", "."))


def _new_norm_like(norm, channels):
    """A fresh norm of the same kind and hyper-parameters as ``norm`` with ``channels`` channels."""
    base = next(c for c in type(norm).__mro__ if not issubclass(c, SlimModule))
    if issubclass(base, FrozenBatchNorm2d):
        return base(channels, eps=norm.eps)
    private = base(
        channels,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    if hasattr(norm, "_stats_mode"):  # detectron2's NaiveSyncBatchNorm
        private._stats_mode = norm._stats_mode
    return private


class SwitchableNorm(SlimModule):
    """Mixin turning a stock batch norm into a switchable one (S-Nets) or a universal one (US-Nets).

    The stock layer itself is the width-1.0 norm, under the stock state-dict names, so stock
    checkpoints load unchanged. Narrower widths use ``private.w0_25`` etc., each a norm of the same
    kind with that width's channel count.

    Two modes, chosen by the widths given to `init_private_norms`:

    - switchable (trained widths listed): one trained private norm per width. A checkpoint without
      any private entry (stock detectron2 / ImageNet) initialises every private norm from the full
      one, sliced. A checkpoint holding private norms for *other* widths gives the missing widths
      the sliced affine but no statistics: such a width refuses to run in eval mode until
      calibrated (`slim_det.calibrate_norms`), instead of silently using the full norm's slice.
    - universal (no widths): one shared norm, sliced at any width. Training normalises with batch
      statistics (FrozenBN: its frozen statistics, sliced); the shared running statistics mix all
      widths and are never used. Evaluation at a width needs that width's calibrated statistics.

    Calibration stores a width's statistics where that width's eval forward reads them: the stock
    buffers (width 1.0, switchable), a trained private norm, or a *calibrated* private norm created
    for a width that has no trained one (every width in universal mode, including "w1"). A
    calibrated private norm copies the full norm's affine, sliced, at calibration time and is not
    trained; it is saved in checkpoints and re-created when one is loaded. Because its statistics
    describe the current weights only, a training-mode forward drops every calibrated private norm.
    """

    universal = False
    _calibration = None  # per private name: [count, sum, sum of squares] while calibrating
    min_width = 0.0  # as the layer it normalizes (see make_slimmable_)

    def init_private_norms(self, widths, divisor, slim_channels):
        """Create the private norms; called once when the layer is made switchable.

        Args:
            widths (list[float]): the trained widths, containing 1.0 (switchable mode); or empty
                for universal mode (one shared norm, per-width statistics from calibration).
            divisor (int): channel rounding divisor, as for the layer producing the input.
            slim_channels (bool): whether the input narrows with the width (False for the norm of a
                layer whose output stays full width but whose statistics still differ per width).
        """
        self.divisor = divisor
        self.slim_channels = slim_channels
        self.widths = tuple(sorted(set(float(w) for w in widths)))
        self.universal = not self.widths
        self.calibrated = set()  # names of calibrated (untrained) private norms
        self.missing_stats = set()  # names of trained private norms the checkpoint did not hold
        self.checkpoint_widths = None  # widths with norms in the last loaded checkpoint
        self.sliced_from_full = False  # whether the last load sliced the full norm
        self.private = nn.ModuleDict()
        for width in self.widths:
            if width < 1.0:
                private = self._new_private(width, with_stats=True)
                private.train(self.training)
                self.private[private_norm_name(width)] = private

    def _new_private(self, width, with_stats):
        # A norm of this width whose affine (and, with_stats, statistics) is the full one, sliced.
        return self._new_private_channels(self.channels_at(width), with_stats)

    def _new_private_channels(self, channels, with_stats):
        private = _new_norm_like(self, channels)
        names = ("weight", "bias") + (("running_mean", "running_var") if with_stats else ())
        with torch.no_grad():
            for name in names:
                value, target = getattr(self, name, None), getattr(private, name, None)
                if value is not None and target is not None:
                    target.copy_(value[:channels])
            steps = getattr(self, "num_batches_tracked", None)
            if with_stats and steps is not None and private.num_batches_tracked is not None:
                private.num_batches_tracked.copy_(steps)
        return private.to(self.running_mean.device)

    def channels_at(self, width):
        full = self.num_features
        if not self.slim_channels:
            return full
        return active_channels(full, max(width, self.min_width), self.divisor, self.expansion)

    def active_norm_name(self):
        """The private norm the current setting runs: its width's, or its channel configuration's."""
        return self.config_name or private_norm_name(self.width)

    def active_channel_count(self):
        """The channel count of the current setting (width or channel configuration)."""
        if self.channels is not None and self.slim_channels:
            return self.channels
        return self.channels_at(self.width)

    def has_statistics(self, width):
        """Whether evaluation at ``width`` has statistics (trained or calibrated) to use."""
        name = private_norm_name(width)
        if name in self.missing_stats:
            return False
        if name in self.private:
            return True
        return not self.universal and width >= 1.0

    def forward(self, x):
        if (not self.training and self.config_name is None and self.has_statistics(self.width)
                and x.shape[1] == self.active_channel_count()):
            # Evaluation at a width with statistics: what the checks below end in when they
            # pass, without them (they cost as much as a small batch norm itself).
            name = private_norm_name(self.width)
            return self.private[name](x) if name in self.private else super().forward(x)
        width, name = self.width, self.active_norm_name()
        calibrating = self._calibration is not None and self.training
        if not calibrating:
            if self.training and self.calibrated:
                self.drop_calibrated()
            if self.config_name is not None:
                if not self.training and name not in self.private:
                    raise ValueError(self._no_configuration_statistics_message())
            else:
                runnable = name in self.private or self.universal or width >= 1.0
                has_statistics = self.training or self.has_statistics(width) or (
                    self.universal and isinstance(self, FrozenBatchNorm2d))  # frozen: as trained
                if not (runnable and has_statistics):
                    raise ValueError(self._no_statistics_message(width))
        expected = self.active_channel_count()
        if x.shape[1] != expected:
            setting = (f"channel configuration {self.config_name}" if self.config_name
                       else f"width {width:g}")
            raise ValueError(
                f"{type(self).__name__} at {setting} expects {expected} channels, "
                f"got {x.shape[1]}."
            )
        if self.config_name is not None and self.training and not calibrating:
            return self._configuration_train_forward(x)
        if calibrating:
            return self._calibration_forward(x)
        if name in self.private:
            return self.private[name](x)
        if self.universal:
            return self._shared_forward(x)
        return super().forward(x)

    def _no_configuration_statistics_message(self):
        return (
            f"Channel configuration {self.config_name} has no calibrated batch-norm statistics: "
            "calibrate it first (slim_det.calibrate_norms(model, loader, [config], num_images)) "
            "or load a checkpoint saved after calibrating it."
        )

    def _no_statistics_message(self, width):
        if self.universal:
            return (
                f"Width {width:g} has no calibrated batch-norm statistics: a universally "
                "slimmable model trains with batch statistics, so run slim_det.calibrate_norms "
                "(or evaluate with TEST.CALIBRATION_IMAGES > 0) first."
            )
        if private_norm_name(width) in self.missing_stats:
            return (
                f"Width {width:g} has no batch-norm statistics: the loaded checkpoint has norms "
                f"for widths {self.checkpoint_widths} only. Calibrate it (slim_det.calibrate_norms"
                ", tools/calibrate.py) or load a checkpoint trained with this width."
            )
        return (
            f"Width {width:g} has no private norm: switchable norms were trained for widths "
            f"{[float(w) for w in self.widths]}. Use one of these widths, or calibrate it "
            "(slim_det.calibrate_norms, or evaluate with TEST.CALIBRATION_IMAGES > 0)."
        )

    def _shared_forward(self, x):
        # Universal mode (and channel configurations in training): the shared norm, sliced.
        channels, full = x.shape[1], self.num_features
        if isinstance(self, FrozenBatchNorm2d):
            return F.batch_norm(x, self.running_mean[:channels], self.running_var[:channels],
                                self.weight[:channels], self.bias[:channels], False, 0.0, self.eps)
        # The stock forward computes (and for SyncBN synchronises) batch statistics; per-channel,
        # so zero channels padded up to full width leave the active channels exact.
        if channels < full:
            x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, full - channels])
        return super().forward(x)[:, :channels]

    def _configuration_train_forward(self, x):
        # Training a channel configuration: batch statistics (FrozenBN: its frozen ones) and the
        # full affine, sliced. No running statistics move: those of a width, or of the shared
        # norm, must not absorb another architecture's features.
        channels = x.shape[1]
        weight = None if self.weight is None else self.weight[:channels]
        bias = None if self.bias is None else self.bias[:channels]
        if isinstance(self, FrozenBatchNorm2d):
            return F.batch_norm(x, self.running_mean[:channels], self.running_var[:channels],
                                weight, bias, False, 0.0, self.eps)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def drop_calibrated(self):
        """Delete the calibrated private norms (their statistics belong to older weights)."""
        for name in self.calibrated:
            del self.private[name]
        self.calibrated = set()

    def use_shared_statistics(self, widths):
        """Universal mode, for comparison only: evaluate ``widths`` with the shared norm's running
        statistics, sliced (accumulated in training over every width drawn; see
        `slim_det.calibration.use_shared_statistics`)."""
        if not self.universal:
            raise ValueError("Shared running statistics exist only in universal mode; a "
                             "switchable norm has each width's own.")
        for width in widths:
            self._add_calibrated_private(private_norm_name(width), self.channels_at(width),
                                         with_stats=True)

    def _add_calibrated_private(self, name, channels, with_stats):
        # A private norm that is not trained: frozen affine, statistics set from outside.
        self.private[name] = self._new_private_channels(channels, with_stats).eval()
        for param in self.private[name].parameters():
            param.requires_grad_(False)
        self.calibrated.add(name)

    def start_calibration(self, widths):
        """Prepare to accumulate statistics at ``widths`` (see `slim_det.calibrate_norms`)."""
        self._calibration = None
        saved = self.width, self.channels, self.config_name
        try:
            for width in widths:
                self.width, self.channels, self.config_name = float(width), None, None
                self.start_calibration_of_current()
        finally:
            self.width, self.channels, self.config_name = saved

    def start_calibration_of_current(self):
        """Prepare to accumulate statistics of the current setting (a width or a channel
        configuration), in addition to the settings already started."""
        name, channels = self.active_norm_name(), self.active_channel_count()
        full_norm = self.config_name is None and not self.universal and self.width >= 1.0
        if not full_norm and (name not in self.private or name in self.calibrated):
            self._add_calibrated_private(name, channels, with_stats=False)
        device = self.running_mean.device
        if self._calibration is None:
            self._calibration = {}
        self._calibration[name] = [
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros(channels, dtype=torch.float64, device=device),
            torch.zeros(channels, dtype=torch.float64, device=device)]

    def _calibration_forward(self, x):
        # Normalise with batch statistics, as in training; accumulate exact sums meanwhile.
        acc = self._calibration[self.active_norm_name()]
        dims = [0] + list(range(2, x.dim()))
        acc[0] += x.numel() // x.shape[1]
        acc[1] += x.sum(dims, dtype=torch.float64)
        acc[2] += (x * x).sum(dims, dtype=torch.float64)
        name, channels = self.active_norm_name(), x.shape[1]
        source = self.private[name] if name in self.private else self
        weight, bias = getattr(source, "weight", None), getattr(source, "bias", None)
        if source is self and channels < self.num_features:
            weight = None if weight is None else weight[:channels]
            bias = None if bias is None else bias[:channels]
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def calibration_tensors(self):
        """The accumulators, flat, in a fixed order (for one all-reduce over processes)."""
        return [t for name in sorted(self._calibration) for t in self._calibration[name]]

    def finish_calibration(self):
        """Write the accumulated mean and unbiased variance; return the private norm names (see
        `active_norm_name`) whose setting saw no data."""
        empty = []
        for name, (count, total, squares) in self._calibration.items():
            target = self.private[name] if name in self.private else self
            if count < 2:
                empty.append(name)
                continue
            mean = total / count
            var = (squares / count - mean * mean).clamp_(min=0) * (count / (count - 1))
            with torch.no_grad():
                target.running_mean.copy_(mean)
                target.running_var.copy_(var)
            self.missing_stats.discard(name)
        self._calibration = None
        return empty

    def abort_calibration(self):
        self._calibration = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.drop_calibrated()  # the checkpoint decides which calibrated widths exist
        self.missing_stats = set()
        start = prefix + "private."
        stored = {k[len(start):].split(".")[0] for k in state_dict if k.startswith(start)}
        self.checkpoint_widths = sorted({1.0} | {width_of_private_name(n) for n in stored
                                                 if not is_configuration_name(n)})
        self.sliced_from_full = not stored
        for name in sorted(stored - set(self.private)):
            # A calibrated width (or channel configuration) of the saved model: re-create its
            # private norm to receive it.
            if is_configuration_name(name):
                saved = state_dict.get(f"{start}{name}.running_mean")
                if saved is None:
                    saved = state_dict[f"{start}{name}.weight"]
                channels = saved.shape[0]
            else:
                channels = self.channels_at(width_of_private_name(name))
            self._add_calibrated_private(name, channels, with_stats=False)
        for name, private in self.private.items():
            if name in stored or is_configuration_name(name):
                continue
            # A stock checkpoint has only the full norm: every private norm is its slice. A
            # checkpoint with other widths' norms only gives the affine; statistics stay missing.
            keys = ("weight", "bias") if stored else ("weight", "bias", "running_mean",
                                                       "running_var", "num_batches_tracked")
            for key in keys:
                full_key = prefix + key
                if getattr(private, key, None) is None or full_key not in state_dict:
                    continue
                value = state_dict[full_key]
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    value = value[: private.num_features].clone()
                state_dict[f"{start}{name}.{key}"] = value
            if stored:
                self.missing_stats.add(name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def width_of_private_name(name):
    """The width of a private norm's name ("w0_25" -> 0.25); the inverse of private_norm_name."""
    return float(name[1:].replace("_", "."))


def is_configuration_name(name):
    """Whether a private norm belongs to a channel configuration ("c" + its digest) rather than to
    a width ("w0_25"); see `slim_det.channels`."""
    return name.startswith("c")


_SWITCHABLE_CLASSES = {}


def switchable_norm_class(norm_class):
    """The switchable twin of a batch-norm class (BN, SyncBN, NaiveSyncBN or FrozenBN)."""
    if norm_class not in _SWITCHABLE_CLASSES:
        _SWITCHABLE_CLASSES[norm_class] = type(
            "Switchable" + norm_class.__name__, (SwitchableNorm, norm_class), {}
        )
    return _SWITCHABLE_CLASSES[norm_class]


_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def _make_norm_slimmable(norm, widths, divisor, slim_channels, expansion=1, min_width=0.0):
    if isinstance(norm, SlimModule):
        return
    norm.expansion = expansion
    norm.min_width = min_width
    if isinstance(norm, nn.GroupNorm):
        if not slim_channels:
            return  # GroupNorm keeps no statistics, so a full-width one is valid at every width
        norm.__class__ = SlimGroupNorm
        norm.divisor = divisor
    elif isinstance(norm, _BATCH_NORMS):
        norm.__class__ = switchable_norm_class(type(norm))
        norm.init_private_norms(widths, divisor, slim_channels)
    else:
        raise ValueError(
            f"Cannot make {type(norm).__name__} slimmable; supported norms are BN, SyncBN, "
            "NaiveSyncBN, FrozenBN and GN."
        )


def _make_layer_slimmable(layer, name, divisor, slim_out, expansion, min_width):
    if isinstance(layer, nn.Conv2d):
        if layer.groups > 1 and layer.groups != layer.in_channels:
            raise ValueError(
                f"Layer '{name}' is a grouped conv (groups={layer.groups}); only plain and "
                "depthwise convs can be slimmed (set RESNETS.NUM_GROUPS to 1)."
            )
        if layer.padding_mode != "zeros":
            raise ValueError(f"Layer '{name}' uses padding_mode={layer.padding_mode!r}; only "
                             "'zeros' can be slimmed.")
        if not isinstance(layer, Conv2d):  # plain torch conv: no norm / activation
            layer.norm, layer.activation = None, None
        layer.__class__ = SlimConv2d
    elif isinstance(layer, nn.ConvTranspose2d):
        if layer.groups != 1:
            raise ValueError(f"Layer '{name}' is a grouped transposed conv; cannot be slimmed.")
        layer.__class__ = SlimConvTranspose2d
    elif isinstance(layer, nn.Linear):
        layer.__class__ = SlimLinear
    else:
        return False
    layer.divisor = divisor
    layer.slim_out = slim_out
    layer.expansion = expansion
    layer.min_width = min_width
    return True


def make_slimmable_(module, widths, divisor=8, slim_out=True, keep_out=(), expansions=None,
                    min_width=0.0):
    """Make every conv, linear and norm inside ``module`` slimmable, in place.

    Args:
        module (nn.Module): a built stock module (backbone, FPN or head).
        widths (list[float]): trained widths; switchable norms get one private norm per width.
            Empty: universal mode, every batch norm is one shared norm (see `SwitchableNorm`).
        divisor (int): channel rounding divisor for `make_divisible`.
        slim_out (bool): whether layers narrow their outputs with the width. With False, layers
            only follow their (narrower) inputs, and their norms still switch per width: this is
            how an unslimmed FPN consumes slim backbone features.
        keep_out (Iterable[str]): names (relative to ``module``) of layers whose output stays full
            width, such as class / box / mask / keypoint predictors.
        expansions (dict[str, int]): names of expanded layers (and the norms inside them) whose
            output is ``expansion`` x a base width, rounded as the base (see `active_channels`).
        min_width (float): layers that slim their output never go below this width: at width
            w they use the channels of ``max(w, min_width)`` (MODEL.SLIM.FPN_MIN_WIDTH).

    Returns:
        nn.Module: ``module`` itself.
    """
    keep_out, expansions = set(keep_out), dict(expansions or {})
    unknown = (keep_out | set(expansions)) - {name for name, _ in module.named_modules()}
    if unknown:
        raise ValueError(f"Names {sorted(unknown)} are not layers of {type(module).__name__}.")
    handled = set()
    for name, layer in list(module.named_modules()):
        if isinstance(layer, SwitchableNorm):
            # Private norms are plain norms of a fixed width; they must never slim themselves.
            handled.update(id(m) for m in layer.private.modules())
        if id(layer) in handled or isinstance(layer, SlimModule):
            continue
        layer_slims = slim_out and name not in keep_out
        expansion = expansions.get(name, 1)
        if _make_layer_slimmable(layer, name, divisor, layer_slims, expansion, min_width):
            norm = getattr(layer, "norm", None)
            if isinstance(norm, nn.Module):
                _make_norm_slimmable(norm, widths, divisor, layer_slims, expansion, min_width)
                handled.add(id(norm))
        elif isinstance(layer, _BATCH_NORMS + (nn.GroupNorm,)):
            _make_norm_slimmable(layer, widths, divisor, slim_out, expansion, min_width)
    return module
