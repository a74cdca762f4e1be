"""Slimmable MobileNet v1 / v2 trunks, their FPN versions, and an ImageNet classifier wrapper.

Each trunk is a plain detectron2 `Backbone` built from `detectron2.layers.Conv2d` + `get_norm`,
then made slimmable in place with the channel rules of the S-Nets / US-Nets authors: every layer
uses ``make_divisible(c * w, 8)`` channels, v2's expanded layers use 6 x the rounded base width, the
stem reads all 3 input channels, and v2's last 1x1 conv keeps its 1280 outputs at every width.

Stages follow detectron2's ResNet names so FPN configs and ``FREEZE_AT`` carry over unchanged:

======  ======  =================================  =========================================
output  stride  MobileNet v1 (channels at 1.0)     MobileNet v2
======  ======  =================================  =========================================
stem    2       conv 32 + dw-separable block 64    conv 32 + inverted residual (t=1) 16
res2    4       2 blocks, 128                      2 blocks, 24
res3    8       2 blocks, 256                      3 blocks, 32
res4    16      6 blocks, 512                      4 blocks 64 + 3 blocks 96
res5    32      2 blocks, 1024                     3 blocks 160, 1 block 320, 1x1 conv 1280
======  ======  =================================  =========================================

Module names (the names converted checkpoints use): ``stem.conv1``, ``stem.block``, ``res2.0``,
...; a v1 block has ``depthwise`` and ``pointwise`` convs, a v2 block ``expand`` (absent when t=1),
``depthwise`` and ``project``; v2's last conv is ``res5.conv_last``. Each conv holds its ``norm``.
"""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from ..config import fpn_min_width, slim_settings
from ..layers import make_slimmable_

__all__ = [
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetClassifier",
    "make_mobilenet_slimmable_",
    "build_mobilenet_classifier",
    "build_slim_mobilenet_v1_backbone",
    "build_slim_mobilenet_v2_backbone",
    "build_slim_mobilenet_v1_fpn_backbone",
    "build_slim_mobilenet_v2_fpn_backbone",
    "build_slim_retinanet_mobilenet_v1_fpn_backbone",
    "build_slim_retinanet_mobilenet_v2_fpn_backbone",
]

STAGES = ("stem", "res2", "res3", "res4", "res5")

# Blocks per stage, as (expansion, out_channels, stride); v1 blocks have no expansion (1).
V1_LAYOUT = OrderedDict(
    stem=[(1, 64, 1)],
    res2=[(1, 128, 2), (1, 128, 1)],
    res3=[(1, 256, 2), (1, 256, 1)],
    res4=[(1, 512, 2)] + [(1, 512, 1)] * 5,
    res5=[(1, 1024, 2), (1, 1024, 1)],
)
V2_LAYOUT = OrderedDict(
    stem=[(1, 16, 1)],
    res2=[(6, 24, 2), (6, 24, 1)],
    res3=[(6, 32, 2)] + [(6, 32, 1)] * 2,
    res4=[(6, 64, 2)] + [(6, 64, 1)] * 3 + [(6, 96, 1)] * 3,
    res5=[(6, 160, 2)] + [(6, 160, 1)] * 2 + [(6, 320, 1)],
)
STEM_CHANNELS = 32
V2_LAST_CHANNELS = 1280


def _conv(in_channels, out_channels, kernel_size, stride, norm, groups=1, activation=F.relu6):
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        groups=groups,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=activation,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class DepthwiseSeparableBlock(nn.Module):
    """MobileNet v1's block: 3x3 depthwise conv, then 1x1 pointwise conv, each with norm + ReLU6."""

    def __init__(self, in_channels, out_channels, stride, norm):
        super().__init__()
        self.depthwise = _conv(in_channels, in_channels, 3, stride, norm, groups=in_channels)
        self.pointwise = _conv(in_channels, out_channels, 1, 1, norm)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class InvertedResidualBlock(nn.Module):
    """MobileNet v2's block: 1x1 expand, 3x3 depthwise, linear 1x1 project, identity shortcut.

    The shortcut exists when the block keeps resolution and channels; channels match at every
    width too, because both ends round the same base channel count.
    """

    def __init__(self, in_channels, out_channels, stride, norm, expansion):
        super().__init__()
        hidden = in_channels * expansion
        if expansion != 1:
            self.expand = _conv(in_channels, hidden, 1, 1, norm)
        else:
            self.expand = None
        self.depthwise = _conv(hidden, hidden, 3, stride, norm, groups=hidden)
        self.project = _conv(hidden, out_channels, 1, 1, norm, activation=None)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return out + x if self.use_shortcut else out


def _freeze(module):
    # Same as detectron2's CNNBlockBase.freeze, for any module (stages hold non-block convs too).
    # It must run before make_slimmable_, which would otherwise lose the switchable norms.
    for param in module.parameters():
        param.requires_grad = False
    FrozenBatchNorm2d.convert_frozen_batchnorm(module)  # replaces the norms of module's convs
    for norm in module.modules():
        # The conversion carries BN's num_batches_tracked over, a buffer FrozenBN never has (nor
        # the private FrozenBNs made from it): drop it, so frozen stages equal NORM "FrozenBN".
        if isinstance(norm, FrozenBatchNorm2d):
            norm._buffers.pop("num_batches_tracked", None)


class _MobileNet(Backbone):
    """A plain MobileNet trunk; subclasses give the layout and the block type."""

    layout = None

    def __init__(self, in_channels=3, norm="BN", out_features=None, freeze_at=0):
        """
        Args:
            in_channels (int): input channels (3 for RGB images); never slimmed.
            norm (str): a detectron2 `get_norm` name: "BN", "SyncBN", "FrozenBN", ... ("GN" is
                not possible: MobileNet layers have 16, 24 or 144 channels, not multiples of 32).
            out_features (list[str] or None): any of "stem", "res2".."res5"; default ["res5"].
                Stages after the last requested one are not built.
            freeze_at (int): 0 trains everything, 1 freezes the stem, k >= 2 the stem and res2..resk
                (requires_grad False, BN turned into FrozenBN), as detectron2's ``FREEZE_AT``.
        """
        super().__init__()
        if norm == "GN":
            raise ValueError(
                "MODEL.MOBILENET.NORM 'GN' is not supported: detectron2's GN uses 32 groups and "
                "MobileNet layers have 16, 24 or 144 channels. Use BN, SyncBN or FrozenBN."
            )
        out_features = list(out_features or ["res5"])
        unknown = [f for f in out_features if f not in STAGES]
        if unknown or not out_features:
            raise ValueError(
                f"MobileNet out_features must be a non-empty subset of {list(STAGES)}; got "
                f"{out_features}."
            )
        self._out_features = out_features
        self._out_feature_channels, self._out_feature_strides = {}, {}
        last_stage = max(STAGES.index(f) for f in out_features)

        channels, stride = STEM_CHANNELS, 2
        for index, name in enumerate(STAGES[: last_stage + 1]):
            blocks = OrderedDict()
            if name == "stem":
                blocks["conv1"] = _conv(in_channels, channels, 3, 2, norm)
            for i, (expansion, out_channels, block_stride) in enumerate(self.layout[name]):
                block = self._block(channels, out_channels, block_stride, norm, expansion)
                blocks["block" if name == "stem" else str(i)] = block
                channels, stride = out_channels, stride * block_stride
            channels = self._finish_stage(name, blocks, channels, norm)
            self.add_module(name, nn.Sequential(blocks))
            self._out_feature_channels[name] = channels
            self._out_feature_strides[name] = stride
            if index < freeze_at:
                _freeze(getattr(self, name))
        self._stage_names = STAGES[: last_stage + 1]

    def _block(self, in_channels, out_channels, stride, norm, expansion):
        raise NotImplementedError

    def _finish_stage(self, name, blocks, channels, norm):
        return channels

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, C, H, W) images.

        Returns:
            dict[str, Tensor]: the requested stage outputs.
        """
        outputs = {}
        for name in self._stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def slim_rules(self):
        """(keep_out names, {expanded layer name: expansion}) for `make_slimmable_`."""
        keep_out, expansions = [], {}
        for name, module in self.named_modules():
            if isinstance(module, InvertedResidualBlock) and module.expand is not None:
                expansion = module.expand.out_channels // module.expand.in_channels
                expansions[f"{name}.expand"] = expansion
                expansions[f"{name}.depthwise"] = expansion
            elif name.endswith("conv_last"):
                keep_out.append(name)
        return keep_out, expansions


class MobileNetV1(_MobileNet):
    """MobileNet v1 (Howard et al. 2017) as a detectron2 backbone; see the module docstring."""

    layout = V1_LAYOUT

    def _block(self, in_channels, out_channels, stride, norm, expansion):
        return DepthwiseSeparableBlock(in_channels, out_channels, stride, norm)


class MobileNetV2(_MobileNet):
    """MobileNet v2 (Sandler et al. 2018) as a detectron2 backbone; see the module docstring."""

    layout = V2_LAYOUT

    def _block(self, in_channels, out_channels, stride, norm, expansion):
        return InvertedResidualBlock(in_channels, out_channels, stride, norm, expansion)

    def _finish_stage(self, name, blocks, channels, norm):
        if name != "res5":
            return channels
        blocks["conv_last"] = _conv(channels, V2_LAST_CHANNELS, 1, 1, norm)
        return V2_LAST_CHANNELS


VERSIONS = {1: MobileNetV1, 2: MobileNetV2}


def make_mobilenet_slimmable_(trunk, widths, divisor=8):
    """Make a plain `MobileNetV1` / `MobileNetV2` trunk slimmable in place (the authors' rules).

    Returns:
        the trunk itself.
    """
    keep_out, expansions = trunk.slim_rules()
    return make_slimmable_(trunk, widths, divisor, keep_out=keep_out, expansions=expansions)


class MobileNetClassifier(nn.Module):
    """An ImageNet classifier: trunk, global average pooling, linear classifier.

    Used to count FLOPs as the papers do and to check converted ImageNet checkpoints; its state
    dict names are ``trunk.*`` and ``classifier.*``.
    """

    def __init__(self, trunk, num_classes=1000):
        super().__init__()
        self.trunk = trunk
        self.classifier = nn.Linear(trunk.output_shape()["res5"].channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        features = self.trunk(x)["res5"]
        return self.classifier(features.mean(dim=(2, 3)))


def build_mobilenet_classifier(version, widths=None, divisor=8, num_classes=1000, norm="BN"):
    """A MobileNet classifier, slimmable when ``widths`` is given (its output never slims).

    Args:
        version (int): 1 or 2.
        widths (list[float] or None): the trained widths, or None for the plain network.
    """
    if version not in VERSIONS:
        raise ValueError(f"MobileNet version must be 1 or 2; got {version!r}.")
    model = MobileNetClassifier(VERSIONS[version](norm=norm), num_classes)
    if widths is not None:
        make_mobilenet_slimmable_(model.trunk, widths, divisor)
        make_slimmable_(model, widths, divisor, keep_out=("classifier",))
    return model


def _build_slim_trunk(cfg, input_shape, version):
    widths, _, divisor = slim_settings(cfg)
    trunk = VERSIONS[version](
        in_channels=input_shape.channels,
        norm=cfg.MODEL.MOBILENET.NORM,
        out_features=cfg.MODEL.MOBILENET.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
    return make_mobilenet_slimmable_(trunk, widths, divisor)


def _build_slim_fpn(cfg, input_shape, version, retinanet=False):
    # Same FPN as detectron2's build_resnet_fpn_backbone (RetinaNet: its P6 / P7 from the last
    # stage, as build_retinanet_resnet_fpn_backbone), over a slim MobileNet bottom-up.
    widths, scope, divisor = slim_settings(cfg)
    bottom_up = _build_slim_trunk(cfg, input_shape, version)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels)
    else:
        top_block = LastLevelMaxPool()
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    return make_slimmable_(fpn, widths, divisor, slim_out=(scope == "all"),
                           min_width=fpn_min_width(cfg))


@BACKBONE_REGISTRY.register()
def build_slim_mobilenet_v1_backbone(cfg, input_shape):
    """A slimmable MobileNet v1 trunk configured by ``MODEL.MOBILENET.*`` and ``MODEL.SLIM.*``."""
    return _build_slim_trunk(cfg, input_shape, 1)


@BACKBONE_REGISTRY.register()
def build_slim_mobilenet_v2_backbone(cfg, input_shape):
    """A slimmable MobileNet v2 trunk configured by ``MODEL.MOBILENET.*`` and ``MODEL.SLIM.*``."""
    return _build_slim_trunk(cfg, input_shape, 2)


@BACKBONE_REGISTRY.register()
def build_slim_mobilenet_v1_fpn_backbone(cfg, input_shape):
    """A slimmable MobileNet v1 with an FPN that slims with ``MODEL.SLIM.SCOPE`` "all"."""
    return _build_slim_fpn(cfg, input_shape, 1)


@BACKBONE_REGISTRY.register()
def build_slim_mobilenet_v2_fpn_backbone(cfg, input_shape):
    """A slimmable MobileNet v2 with an FPN that slims with ``MODEL.SLIM.SCOPE`` "all"."""
    return _build_slim_fpn(cfg, input_shape, 2)


@BACKBONE_REGISTRY.register()
def build_slim_retinanet_mobilenet_v1_fpn_backbone(cfg, input_shape):
    """RetinaNet's P3-P7 FPN over a slimmable MobileNet v1 (P6 / P7 slim with the FPN)."""
    return _build_slim_fpn(cfg, input_shape, 1, retinanet=True)


@BACKBONE_REGISTRY.register()
def build_slim_retinanet_mobilenet_v2_fpn_backbone(cfg, input_shape):
    """RetinaNet's P3-P7 FPN over a slimmable MobileNet v2 (P6 / P7 slim with the FPN)."""
    return _build_slim_fpn(cfg, input_shape, 2, retinanet=True)
