"""Plain fixed-channel backbones: a slimmable backbone frozen at one width.

Stock detectron2 can express a narrower ResNet-50/101 through its config keys, but not a narrower
ResNet-18/34 (it asserts ``RES2_OUT_CHANNELS == 64``), a MobileNet, or a width whose rounded
channel counts do not follow the stock formulas. For those, `build_fixed_channel_backbone` builds
the slimmable backbone named by ``MODEL.FIXED_CHANNEL.BACKBONE`` and `freeze_width_` turns it into
an ordinary network of ``MODEL.FIXED_CHANNEL.WIDTH``: every slimmable layer becomes the stock layer
class with physically sliced tensors, and every switchable norm is replaced by that width's private
norm, under the stock names. The result holds no slimmable layer and runs no slicing at all.

`build_fixed_channel_sem_seg_head` does the same for Panoptic FPN's semantic head under scope
"all": its slimmed GroupNorms keep the full layer's channels per group, which detectron2's stock
head (always 32 groups) cannot express.
"""
import copy

import torch
import torch.nn as nn
from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY

from ..config import SCOPE_ALL_HEADS, SLIM_TWINS
from ..layers import (
    CACHED_WEIGHT,
    SlimConv2d,
    SlimConvTranspose2d,
    SlimGroupNorm,
    SlimLinear,
    SwitchableNorm,
)
from ..width import SlimModule, check_width, set_width

__all__ = ["add_fixed_channel_config", "freeze_width_", "freeze_current_",
           "build_fixed_channel_backbone", "build_fixed_channel_sem_seg_head"]

# Attributes that SlimModule layers carry per instance; a frozen layer must not keep them.
_SLIM_ATTRIBUTES = ("width", "divisor", "slim_out", "expansion", "slim_channels", "widths",
                    "min_width", "channels", "config_name", CACHED_WEIGHT)


def add_fixed_channel_config(cfg):
    """Add ``MODEL.FIXED_CHANNEL.*`` (read by `build_fixed_channel_backbone`) to ``cfg``, in place.

    Returns:
        CfgNode: ``cfg`` itself.
    """
    cfg.MODEL.FIXED_CHANNEL = CN()
    # The slimmable backbone builder that defines the architecture, e.g.
    # "build_slim_resnet_fpn_backbone"; it is built from the rest of the config (MODEL.RESNETS,
    # MODEL.FPN, MODEL.SLIM, ...) at full width, then frozen at WIDTH.
    cfg.MODEL.FIXED_CHANNEL.BACKBONE = ""
    cfg.MODEL.FIXED_CHANNEL.WIDTH = 1.0
    # The slimmable semantic head that `build_fixed_channel_sem_seg_head` freezes at WIDTH, e.g.
    # "SlimSemSegFPNHead" (built with MODEL.SEM_SEG_HEAD.CONVS_DIM, its full-width channels).
    cfg.MODEL.FIXED_CHANNEL.SEM_SEG_HEAD = ""
    return cfg


def _trace_channels(module, sample):
    """Run ``sample`` through a copy of ``module``; record each slimmable layer's input channels.

    The copy runs in eval mode; at a channel configuration its batch norms normalise with batch
    statistics, so a configuration without statistics yet (a model being built) runs too. The
    original module is not touched. Detectors keep every detection (score threshold 0), so that the mask
    and keypoint heads run.

    Returns:
        tuple(dict[str, int], Any): input channels by layer name, and the outputs.
    """
    copy_ = copy.deepcopy(module)
    copy_.eval()
    for layer in copy_.modules():
        if isinstance(layer, SwitchableNorm) and layer.config_name is not None:
            layer.train()
        if hasattr(layer, "test_score_thresh"):
            layer.test_score_thresh = 0.0
    names = {id(m): n for n, m in copy_.named_modules()}
    channels = {}

    def hook(layer, args, _output):
        x = args[0]
        channels[names[id(layer)]] = x.shape[-1] if isinstance(layer, SlimLinear) else x.shape[1]

    for layer in copy_.modules():
        if isinstance(layer, SlimModule):
            layer.register_forward_hook(hook)
    with torch.no_grad():
        outputs = copy_(sample)
    return channels, outputs


def _sliced(param, *sizes):
    index = tuple(slice(0, size) for size in sizes)
    return nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad)


def _freeze_conv(conv, in_channels):
    out, in_per_group, groups = conv.active_shape(in_channels)
    conv.weight = _sliced(conv.weight, out, in_per_group)
    if conv.bias is not None:
        conv.bias = _sliced(conv.bias, out)
    conv.out_channels, conv.in_channels, conv.groups = out, in_per_group * groups, groups
    conv.__class__ = Conv2d


def _freeze_conv_transpose(conv, in_channels):
    out = conv.active_out(conv.out_channels)
    conv.weight = _sliced(conv.weight, in_channels, out)
    if conv.bias is not None:
        conv.bias = _sliced(conv.bias, out)
    conv.in_channels, conv.out_channels = in_channels, out
    conv.__class__ = nn.ConvTranspose2d


def _freeze_linear(linear, in_features):
    out = linear.active_out(linear.out_features)
    linear.weight = _sliced(linear.weight, out, in_features)
    if linear.bias is not None:
        linear.bias = _sliced(linear.bias, out)
    linear.in_features, linear.out_features = in_features, out
    linear.__class__ = nn.Linear


def _freeze_group_norm(norm, channels):
    groups = norm.groups_for(channels)
    if norm.affine:
        norm.weight, norm.bias = _sliced(norm.weight, channels), _sliced(norm.bias, channels)
    norm.num_channels, norm.num_groups = channels, groups
    norm.__class__ = nn.GroupNorm


def _frozen_norm(norm):
    """The plain norm that a switchable norm runs at its current width or channel configuration.

    A channel configuration without calibrated statistics (a model being built, whose weights
    load later) gets the full norm, sliced."""
    name = norm.active_norm_name()
    if name in norm.private:
        return norm.private[name]
    if norm.config_name is not None or norm.width < 1.0:
        return norm._new_private_channels(norm.active_channel_count(), with_stats=True)
    del norm.private
    # switchable_norm_class(C) derives from (SwitchableNorm, C): C is the stock class.
    norm.__class__ = next(c for c in type(norm).__bases__ if not issubclass(c, SlimModule))
    return norm


def _strip_slim_attributes(layer):
    for name in _SLIM_ATTRIBUTES:
        vars(layer).pop(name, None)


def freeze_width_(module, width, sample):
    """Turn every slimmable layer of ``module`` into a plain layer of ``width``, in place.

    Input channels follow the data flow, so they are read off one forward pass of ``sample``.

    Args:
        module (nn.Module): a module holding slimmable layers, e.g. a slim backbone.
        width (float): the width to freeze; switchable norms must have a private norm for it.
        sample: an input of ``module`` that runs every slimmable layer, e.g. a small image batch.

    Returns:
        nn.Module: ``module`` itself, holding no slimmable layer. A detectron2 `Backbone` also
        reports its frozen output channels in ``output_shape()``.

    Raises:
        ValueError: if a slimmable layer did not run on ``sample``.
    """
    set_width(module, check_width(width))
    return freeze_current_(module, sample)


def freeze_current_(module, sample):
    """Like `freeze_width_`, at the setting ``module`` runs now: a width, or a channel
    configuration applied with `slim_det.set_channels` (to ``module`` or a model holding it).

    ``sample`` is one positional input of ``module``; for a detectron2 model, a list of image
    dicts on which the mask / keypoint heads run (give it detections: score threshold 0).
    """
    channels, outputs = _trace_channels(module, sample)
    norms = []
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, SlimModule):
            continue
        if isinstance(layer, SwitchableNorm):
            norms.append(name)
            continue
        if name not in channels:
            raise ValueError(
                f"Layer '{name}' did not run on the sample input, so its width cannot be frozen."
            )
        freeze = {
            SlimConv2d: _freeze_conv,
            SlimConvTranspose2d: _freeze_conv_transpose,
            SlimLinear: _freeze_linear,
            SlimGroupNorm: _freeze_group_norm,
        }[type(layer)]
        freeze(layer, channels[name])
        _strip_slim_attributes(layer)
    for name in norms:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        frozen = _frozen_norm(getattr(parent, attribute))
        _strip_slim_attributes(frozen)
        setattr(parent, attribute, frozen)
    # detectron2 backbones report their channels (read by the heads) from this dict.
    reported = getattr(module, "_out_feature_channels", None)
    if isinstance(outputs, dict) and isinstance(reported, dict):
        for feature, value in outputs.items():
            if feature in reported:
                reported[feature] = value.shape[1]
    return module


def _slim_builder_config(cfg):
    """The config that builds the slimmable modules a fixed-channel model freezes.

    The slim builders validate MODEL.SLIM, which with scope "all" asks for the slim heads and
    meta-architecture; the exported config names stock ones (RetinaNet, StandardROIHeads, ...), so
    the builders get a copy that names their slim twins.
    """
    inner = cfg.clone()
    inner.defrost()
    inner.MODEL.BACKBONE.NAME = cfg.MODEL.FIXED_CHANNEL.BACKBONE
    meta = SLIM_TWINS.get(cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.META_ARCHITECTURE)
    inner.MODEL.META_ARCHITECTURE = meta
    for key, names in SCOPE_ALL_HEADS.get(meta, {}).items():
        node, _, leaf = key.rpartition(".")
        node = _select_node(inner, node)
        if node[leaf] not in names:
            twin = SLIM_TWINS.get(node[leaf])
            node[leaf] = twin if twin in names else names[0]
    return inner


def _select_node(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@BACKBONE_REGISTRY.register()
def build_fixed_channel_backbone(cfg, input_shape):
    """A plain backbone: ``MODEL.FIXED_CHANNEL.BACKBONE`` frozen at ``MODEL.FIXED_CHANNEL.WIDTH``.

    Its parameters are random until a checkpoint (e.g. one written by ``slim_det.export``) loads.

    Returns:
        detectron2.modeling.Backbone: the backbone, holding only stock layers of fixed width.
    """
    fixed = cfg.MODEL.FIXED_CHANNEL
    if not fixed.BACKBONE or fixed.BACKBONE == "build_fixed_channel_backbone":
        raise ValueError(
            "MODEL.FIXED_CHANNEL.BACKBONE must name a slimmable backbone builder, e.g. "
            f"'build_slim_resnet_fpn_backbone'; got {fixed.BACKBONE!r}."
        )
    backbone = BACKBONE_REGISTRY.get(fixed.BACKBONE)(_slim_builder_config(cfg), input_shape)
    # Any size the backbone divides works; channels, not resolution, are what is traced.
    side = max(64, 2 * getattr(backbone, "size_divisibility", 0))
    sample = torch.zeros(1, input_shape.channels, side, side)
    return freeze_width_(backbone, fixed.WIDTH, sample)


@SEM_SEG_HEADS_REGISTRY.register()
def build_fixed_channel_sem_seg_head(cfg, input_shape):
    """A plain semantic head: ``MODEL.FIXED_CHANNEL.SEM_SEG_HEAD`` frozen at
    ``MODEL.FIXED_CHANNEL.WIDTH``.

    The slim head is built on ``input_shape`` (the frozen backbone's narrow features) with its
    full ``MODEL.SEM_SEG_HEAD.CONVS_DIM``, so its GroupNorms keep the slim model's channels per
    group when they freeze. Parameters are random until a checkpoint loads.

    Returns:
        nn.Module: the head (e.g. a `SemSegFPNHead`), holding only stock layers of fixed width.
    """
    fixed = cfg.MODEL.FIXED_CHANNEL
    if not fixed.SEM_SEG_HEAD or fixed.SEM_SEG_HEAD == "build_fixed_channel_sem_seg_head":
        raise ValueError(
            "MODEL.FIXED_CHANNEL.SEM_SEG_HEAD must name a slimmable semantic head, e.g. "
            f"'SlimSemSegFPNHead'; got {fixed.SEM_SEG_HEAD!r}."
        )
    inner = _slim_builder_config(cfg)
    inner.MODEL.SEM_SEG_HEAD.NAME = fixed.SEM_SEG_HEAD
    head = SEM_SEG_HEADS_REGISTRY.get(fixed.SEM_SEG_HEAD)(inner, input_shape)
    # Every level's output is summed at the finest level's size: sizes that the coarsest stride
    # divides twice keep every level at least 2 x 2.
    side = 2 * max(shape.stride for shape in input_shape.values())
    features = {name: torch.zeros(1, shape.channels, side // shape.stride, side // shape.stride)
                for name, shape in input_shape.items()}
    return freeze_width_(head, fixed.WIDTH, features)
