"""Channel groups and non-uniform channel configurations (AutoSlim).

A *channel group* is a set of slimmable layers whose output channel counts must agree: the
layers whose outputs meet in an addition (a ResNet stage's residual stream, the FPN's lateral
convs tied by the top-down sums), or feed one shared layer (the FPN outputs, all read by the same
RPN conv and ROI pooler). A *channel configuration* gives every group a channel count.

Groups are derived from the built model, not from a list per architecture: one forward pass of
a copy of the model records, for every tensor, the group whose layer produced its channels, and
every operation that combines two such tensors (an addition, a write into a shared tensor, a
layer called on both) merges their groups. A uniform width is the special case in which every
group takes ``active_channels(full, width)``; `slim_det.set_width` returns to it exactly.

Typical use::

    groups = slim_det.channel_groups(model)
    slim_det.set_channels(model, {g.name: 0.5 for g in groups})     # fractions or counts
    slim_det.calibrate_norms(model, loader, [slim_det.get_channels(model)], 200)
    outputs = model(inputs)
    slim_det.set_width(model, 1.0)                                   # uniform again
"""
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from .inputs import InputError
from .layers import SlimConv2d, SlimConvTranspose2d, SlimGroupNorm, SlimLinear, SwitchableNorm
from .width import SlimModule, active_channels, get_width, set_width

__all__ = [
    "ChannelGroup",
    "ChannelConfig",
    "channel_groups",
    "set_channels",
    "get_channels",
    "uniform_channels",
    "load_channels",
    "save_channels",
    "current_setting",
    "apply_setting",
    "LayerLink",
    "layer_links",
]

_GROUPS_ATTR = "_slim_channel_groups"
_LINKS_ATTR = "_slim_channel_links"


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channel counts must agree.

    Attributes:
        name (str): stable name: the members' longest common name (e.g.
            ``backbone.bottom_up.res3`` for a stage's residual stream), or the first member's
            name where that is ambiguous.
        members (tuple[str]): module names of the layers whose output channels the group sets.
        norms (tuple[str]): module names of the norms that normalise those channels (including
            those of depthwise convs, which follow their input).
        full (int): the channel count at full width.
        allowed (tuple[int]): every channel count the group can take, ascending; the last is
            ``full``.
        divisor, expansion, min_width: the members' channel rule (see `active_channels`).
    """

    name: str
    members: tuple
    norms: tuple
    full: int
    allowed: tuple
    divisor: int = 8
    expansion: int = 1
    min_width: float = 0.0

    def channels_at(self, width):
        """The channel count of this group at a uniform ``width`` (as `set_width` gives it)."""
        return active_channels(self.full, max(width, self.min_width), self.divisor,
                               self.expansion)


class ChannelConfig(dict):
    """A channel configuration: group name -> channel count, with a stable ``name``.

    The name is a digest of the counts ("c" + 10 hex digits), under which every batch norm keeps
    the calibrated statistics of this configuration.
    """

    @property
    def name(self):
        text = json.dumps(sorted(self.items()))
        return "c" + hashlib.sha1(text.encode()).hexdigest()[:10]


class _Tracer(TorchFunctionMode):
    """Follows which group produced the channels of every tensor during one forward pass."""

    def __init__(self):
        super().__init__()
        self.parent = {}
        self.labels = {}  # id(tensor) -> group node
        self.alive = []  # keeps labelled tensors alive so their ids stay unique
        self.spread = {}  # id(flattened tensor) -> positions per channel (C*H*W features)

    def find(self, node):
        while self.parent.setdefault(node, node) != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)

    def label(self, tensor, node):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
            self.labels[id(tensor)] = node
            self.alive.append(tensor)

    def label_of(self, tensor):
        if isinstance(tensor, torch.Tensor):
            node = self.labels.get(id(tensor))
            return None if node is None else self.find(node)
        return None

    def clear(self, tensor):
        if isinstance(tensor, torch.Tensor):
            self.labels.pop(id(tensor), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        labelled = [(t, self.label_of(t)) for t in _tensors((args, kwargs))]
        labelled = [(t, n) for t, n in labelled if n is not None and t.dim() >= 2]
        if not labelled:
            return out
        outputs = [t for t in _tensors(out) if t.dim() >= 2]
        first, node = labelled[0]
        if (len(outputs) == 1 and first.dim() >= 3 and outputs[0].dim() == 2
                and outputs[0].shape[1] == first[0].numel() and first.shape[1] > 0):
            # Flattened (N, C, H, W) -> (N, C*H*W): a linear layer reads C channels of H*W each.
            self.label(outputs[0], node)
            self.spread[id(outputs[0])] = first[0, 0].numel() * self.spread.get(id(first), 1)
            return out
        channels = first.shape[1]
        same = [n for t, n in labelled if t.shape[1] == channels]
        if outputs and all(o.shape[1] == channels for o in outputs):
            node = same[0]
            for other in same[1:]:
                node = self.union(node, other)  # combined elementwise: counts must agree
            for o in outputs:
                self.label(o, node)
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _is_producer(layer):
    # A layer whose output count the configuration sets; a depthwise conv follows its input.
    if isinstance(layer, SlimConv2d) and layer.is_depthwise:
        return False
    return isinstance(layer, (SlimConv2d, SlimLinear, SlimConvTranspose2d)) and layer.slim_out


def _full_out(layer):
    return layer.out_features if isinstance(layer, SlimLinear) else layer.out_channels


def _default_inputs(model):
    # A detectron2 meta-architecture takes a list of image dicts; 128 px covers every stride.
    if hasattr(model, "pixel_mean") and hasattr(model, "backbone"):
        gen = torch.Generator().manual_seed(0)
        image = torch.rand(3, 128, 128, generator=gen) * 255
        return ([{"image": image.to(model.pixel_mean.device)}],)
    raise ValueError(
        f"channel_groups cannot build an input for {type(model).__name__}: pass `inputs` (a "
        "tuple of positional arguments for one forward pass)."
    )


@torch.no_grad()
def _trace(model, inputs):
    """Union-find of producer layers over one forward pass of a copy of ``model``."""
    copy_ = copy.deepcopy(model)
    set_width(copy_, 1.0)
    copy_.eval()
    for module in copy_.modules():
        if isinstance(module, SwitchableNorm):
            module.train()  # batch statistics: a universal model has none of its own yet
        if hasattr(module, "test_score_thresh"):
            module.test_score_thresh = 0.0  # detections for the mask / keypoint heads to run on
    names = {id(m): n for n, m in copy_.named_modules()}
    tracer = _Tracer()
    node_of = {}  # producer name -> node
    norm_node = {}  # norm name -> node of its input channels
    seen_input = {}  # layer name -> node of the input it consumed
    spread = {}  # linear layer name -> positions per input channel (flattened features)

    def pre_hook(layer, args):
        name = names[id(layer)]
        node = tracer.label_of(args[0]) if args else None
        if node is None:
            return
        if name in seen_input and seen_input[name] != node:
            node = tracer.union(seen_input[name], node)  # a shared layer ties its inputs
        seen_input[name] = node

    def post_hook(layer, args, output):
        name = names[id(layer)]
        spread[name] = tracer.spread.get(id(args[0]), 1)
        if _is_producer(layer):
            node = node_of.setdefault(name, len(node_of))
            tracer.find(node)
        elif isinstance(layer, SlimConv2d) and layer.is_depthwise:
            node = seen_input.get(name)
        else:
            tracer.clear(output)  # a full-width output (predictor, layer outside the scope)
            return
        if node is None:
            return
        tracer.label(output, node)
        norm = getattr(layer, "norm", None)
        if isinstance(norm, (SwitchableNorm, SlimGroupNorm)):
            norm_node[names[id(norm)]] = node

    def standalone_norm_hook(norm, args):
        # A norm that is its own module (RetinaNet's head: conv, norm, ReLU in a Sequential)
        # normalises whatever group produced its input.
        node = tracer.label_of(args[0]) if args else None
        if node is not None:
            norm_node[names[id(norm)]] = node

    attached = {id(m.norm) for m in copy_.modules() if isinstance(getattr(m, "norm", None),
                                                                   torch.nn.Module)}
    handles = []
    for module in copy_.modules():
        if isinstance(module, (SlimConv2d, SlimLinear, SlimConvTranspose2d)):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        elif isinstance(module, (SwitchableNorm, SlimGroupNorm)) and id(module) not in attached:
            handles.append(module.register_forward_pre_hook(standalone_norm_hook))
    try:
        with tracer:
            copy_(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    layers = dict(copy_.named_modules())
    return tracer, node_of, norm_node, layers, seen_input, spread


def _group_name(members):
    prefix = members[0]
    for member in members[1:]:
        while not member.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("._") or members[0]


def channel_groups(model, inputs=None):
    """The channel groups of a slimmable model, derived from one forward pass.

    The result is cached on the model (architecture does not change after building).

    Args:
        model (nn.Module): a slimmable model (a detectron2 meta-architecture, or any module with
            slimmable layers when ``inputs`` is given).
        inputs (tuple): positional arguments of one forward pass; by default one random
            128x128 image for a detectron2 model.

    Returns:
        list[ChannelGroup]: in module order of their first member.

    Raises:
        ValueError: if the model has no slimmable layer that narrows its output, or tied layers
            disagree on their full channel count.
    """
    model = getattr(model, "module", model)
    cached = model.__dict__.get(_GROUPS_ATTR)
    if cached is not None:
        return list(cached)
    tracer, node_of, norm_node, layers, seen_input, spread = _trace(
        model, inputs or _default_inputs(model))
    if not node_of:
        raise ValueError(f"{type(model).__name__} has no slimmable layer that narrows its "
                         "output, so it has no channel group.")
    order = list(layers)
    by_root = {}
    for name in sorted(node_of, key=order.index):
        by_root.setdefault(tracer.find(node_of[name]), []).append(name)
    norms_by_root = {}
    for name, node in norm_node.items():
        norms_by_root.setdefault(tracer.find(node), []).append(name)
    groups, taken = [], set()
    for root, members in by_root.items():
        rules = {(_full_out(layers[m]), layers[m].divisor, layers[m].expansion) for m in members}
        if len(rules) > 1:
            raise ValueError(f"Layers {members} are tied (their outputs are combined) but differ "
                             f"in (full channels, divisor, expansion): {sorted(rules)}.")
        full, divisor, expansion = rules.pop()
        min_width = max(layers[m].min_width for m in members)
        step = divisor * expansion
        floor = active_channels(full, min_width, divisor, expansion) if min_width > 0 else 1
        allowed = tuple(c for c in sorted(set(range(step, full, step)) | {full}) if c >= floor)
        name = _group_name(members)
        if name in taken:
            name = members[0]
        taken.add(name)
        norms = tuple(sorted(norms_by_root.get(root, []), key=order.index))
        groups.append(ChannelGroup(name, tuple(members), norms, full, allowed, divisor,
                                   expansion, min_width))
    model.__dict__[_GROUPS_ATTR] = tuple(groups)
    group_of_root = {tracer.find(node_of[g.members[0]]): g.name for g in groups}

    def group_of(node):
        return None if node is None else group_of_root.get(tracer.find(node))

    model.__dict__[_LINKS_ATTR] = {
        name: LayerLink(group_of(node_of.get(name)), group_of(seen_input.get(name)),
                        spread.get(name, 1))
        for name in spread}
    return groups


@dataclass(frozen=True)
class LayerLink:
    """How a conv / linear layer's channels follow the channel groups (see `layer_links`).

    Attributes:
        out_group (str): the group that sets its output count; None if the output is fixed
            (predictor, layer outside the scope) or follows the input (depthwise conv).
        in_group (str): the group whose channels it reads; None for a fixed input (the image).
        spread (int): input features per channel (H*W for a linear layer after a flatten).
    """

    out_group: str
    in_group: str
    spread: int


def layer_links(model):
    """Layer name -> `LayerLink` for every slimmable conv / linear layer that ran in the trace."""
    model = getattr(model, "module", model)
    channel_groups(model)
    return dict(model.__dict__[_LINKS_ATTR])


def uniform_channels(model, width):
    """The channel configuration that a uniform ``width`` gives (`set_width`'s special case)."""
    return ChannelConfig({g.name: g.channels_at(width) for g in channel_groups(model)})


def _resolve(group, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Channel group '{group.name}': expected a channel count (int) or a "
                         f"fraction in (0, 1] (float); got {value!r}.")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"Channel group '{group.name}': a fraction must be in (0, 1]; "
                             f"got {value!r}.")
        value = group.channels_at(value)
    if value not in group.allowed:
        shown = list(group.allowed)
        if len(shown) > 12:
            shown = shown[:6] + ["..."] + shown[-6:]
        raise ValueError(f"Channel group '{group.name}' cannot have {value} channels; allowed: "
                         f"{shown} (multiples of {group.divisor * group.expansion} up to "
                         f"{group.full}).")
    return value


def set_channels(model, config):
    """Run ``model`` at a channel configuration: one channel count per channel group.

    Layers outside every group (predictors, layers outside MODEL.SLIM.SCOPE, depthwise convs)
    keep following their inputs as at any width. Evaluation needs batch-norm statistics of this
    configuration: calibrate it with `slim_det.calibrate_norms` (a checkpoint saved afterwards
    keeps them). `slim_det.set_width` returns to a uniform width.

    Args:
        model (nn.Module): a slimmable model (DDP-wrapped or not).
        config (Mapping[str, int | float]): every group's name (see `channel_groups`) mapped to
            a channel count from its ``allowed`` counts, or to a fraction in (0, 1] (the count a
            uniform width of that fraction gives the group).

    Returns:
        ChannelConfig: the configuration applied, as channel counts.

    Raises:
        ValueError: naming the group, if a name is unknown or missing, or a count not allowed.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"A channel configuration maps group names to channels; got "
                         f"{type(config).__name__}.")
    inner = getattr(model, "module", model)
    groups = {g.name: g for g in channel_groups(inner)}
    unknown = sorted(set(config) - set(groups))
    if unknown:
        raise ValueError(f"Unknown channel groups {unknown[:5]}; the model's groups are "
                         f"{sorted(groups)}.")
    missing = [name for name in groups if name not in config]
    if missing:
        raise ValueError(f"The channel configuration misses groups {missing[:5]} "
                         f"({len(missing)} of {len(groups)}); every group needs a count.")
    resolved = ChannelConfig({name: _resolve(groups[name], config[name]) for name in groups})
    set_width(inner, 1.0)
    layers = dict(inner.named_modules())
    tag = resolved.name
    for module in inner.modules():
        if isinstance(module, SlimModule):
            module.config_name = tag
    for name, group in groups.items():
        for member in group.members + group.norms:
            layers[member].channels = resolved[name]
    return resolved


def current_setting(model):
    """What ``model`` runs now: its width (float), or its channel configuration (`ChannelConfig`)."""
    inner = getattr(model, "module", model)
    if any(m.config_name is not None for m in inner.modules() if isinstance(m, SlimModule)):
        return get_channels(inner)
    return get_width(inner)


def apply_setting(model, setting):
    """Run ``model`` at ``setting``: a width (`set_width`) or a configuration (`set_channels`)."""
    if isinstance(setting, Mapping):
        set_channels(model, setting)
    else:
        set_width(model, setting)


def get_channels(model):
    """The channel configuration ``model`` runs: at a uniform width, that width's counts.

    Returns:
        ChannelConfig: group name -> channel count.
    """
    inner = getattr(model, "module", model)
    layers = dict(inner.named_modules())
    config = ChannelConfig()
    for group in channel_groups(inner):
        config[group.name] = layers[group.members[0]].active_out(group.full)
    return config


def save_channels(config, path, costs=None):
    """Write a configuration (and optionally its costs) as JSON: ``{"channels": ..., "costs": ...}``."""
    payload = {"channels": dict(config), "costs": dict(costs or {})}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def load_channels(path):
    """Read a configuration written by `save_channels` (or a bare ``{group: channels}`` JSON).

    Raises:
        ValueError: naming the file, if it does not exist, does not parse, or holds no mapping.
    """
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise InputError(f"Channel configuration file {path!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"Channel configuration file {path!r} is not valid JSON: {e}.") from None
    channels = payload.get("channels", payload) if isinstance(payload, dict) else None
    if not isinstance(channels, dict) or not channels:
        raise InputError(f"Channel configuration file {path!r} must hold a JSON object mapping "
                         "group names to channel counts (or {\"channels\": {...}}).")
    return ChannelConfig(channels)
