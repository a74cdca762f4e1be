"""Individually trained baselines: the plain model of one width, built from a slim config.

S-Nets (Table 5) compares one slimmable detector with detectors trained *individually* at each
width. ``MODEL.SLIM.INDIVIDUAL_WIDTH: w`` makes `SlimTrainer` (so ``tools/train_net.py``) build
and train that baseline from the same config file, data, schedule and seed:

- where stock detectron2 config keys express the width exactly (ResNet-50/101), the model *is* a
  stock detectron2 model built from `slim_det.export`'s stock config of that width;
- otherwise (ResNet-18/34, MobileNet) it uses `slim_det.export`'s fixed-channel config, whose
  backbone is built wide and frozen at ``w``. Those backbone tensors are slices of wide tensors,
  so their initial scale would be the wide layer's; `reinitialize_backbone_` redraws them with
  detectron2's own rules for the narrow shapes, so the baseline starts like a model designed at
  that width.

The model carries an `IndividualWidth` tag (no parameters) so the slim training loop and the
per-width evaluation run it unchanged and label its one result row with ``w``.

Pretrained weights (``MODEL.WEIGHTS``) load through `IndividualCheckpointer` as the slimmable
model uses them at width ``w``: a full-width tensor (e.g. detectron2's ImageNet R-50) is cut to
its leading slice, and a slimmable checkpoint's private norm of width ``w`` (e.g. the authors'
converted S-ResNet-50) replaces the full-width norm. A checkpoint of the narrow shapes loads as it
is (S-Nets started each baseline from an ImageNet model trained at its own width).
"""
import logging

import torch
import torch.nn as nn
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from fvcore.nn import weight_init

from .channels import ChannelConfig, load_channels, set_channels
from .config import individual_channels, individual_width, slim_settings
from .export import _backbone_signature, _fixed_channel_config, _stock_config
from .layers import private_norm_name
from .modeling.plain import freeze_current_
from .weights import SlimCheckpointer
from .width import SlimModule, check_width

__all__ = ["IndividualWidth", "individual_config", "build_individual_model",
           "reinitialize_backbone_", "IndividualCheckpointer", "make_checkpointer"]


class IndividualWidth(SlimModule, nn.Module):
    """Tags a plain model as the individually trained model of one width.

    slim_det's training step and evaluation address a model through `slim_det.set_width`; this tag
    holds no parameter and accepts only its own width, so they run the plain model unchanged and a
    request for another width is a clear error instead of a mislabelled result.
    """

    def __init__(self, width):
        nn.Module.__init__(self)
        self._fixed_width = check_width(width)

    @property
    def width(self):
        return self._fixed_width

    @width.setter
    def width(self, value):
        if float(value) != self._fixed_width:
            raise ValueError(
                f"This model was trained individually at width {self._fixed_width:g} "
                f"(MODEL.SLIM.INDIVIDUAL_WIDTH); it cannot run at width {value:g}."
            )

    def forward(self, *args):
        raise RuntimeError("IndividualWidth is a tag; it is never called.")

    def extra_repr(self):
        return f"width={self._fixed_width:g}"


def _check_slim_backbone(cfg):
    name = cfg.MODEL.BACKBONE.NAME
    try:
        builder = BACKBONE_REGISTRY.get(name)
    except KeyError:
        builder = None
    # A stock builder would be "frozen" at full width without complaint: refuse it here.
    if builder is None or not builder.__module__.startswith("slim_det.modeling"):
        raise ValueError(
            "MODEL.SLIM.INDIVIDUAL_WIDTH needs a slim_det backbone (MODEL.BACKBONE.NAME e.g. "
            f"'build_slim_resnet_fpn_backbone') to know that width's channels; got {name!r}."
        )


def individual_config(cfg):
    """The plain config of the individual model of ``cfg``'s MODEL.SLIM.INDIVIDUAL_WIDTH.

    Args:
        cfg (CfgNode): a slim config with MODEL.SLIM.INDIVIDUAL_WIDTH set.

    Returns:
        tuple(CfgNode, str): the config and its kind: "stock" (only stock detectron2 keys; its
        backbone has exactly the slim backbone's channels at that width) or "fixed_channel".

    Raises:
        ValueError: if INDIVIDUAL_WIDTH is off or invalid, or the backbone is not slim_det's.
    """
    width = individual_width(cfg)
    if not width:
        raise ValueError("MODEL.SLIM.INDIVIDUAL_WIDTH is 0 (off): there is no individual model.")
    _check_slim_backbone(cfg)
    _, scope, divisor = slim_settings(cfg)
    fixed = _fixed_channel_config(cfg, width, divisor, scope)
    stock = _stock_config(cfg, width, divisor, scope)
    if stock is not None:
        # Stock keys follow detectron2's channel formulas, which may round differently from
        # active_channels: use them only when every backbone tensor has the same shape.
        on_cpu = [c.clone() for c in (fixed, stock)]
        for c in on_cpu:
            c.MODEL.DEVICE = "cpu"
        if _backbone_signature(build_backbone(on_cpu[0])) == _backbone_signature(
                build_backbone(on_cpu[1])):
            return stock, "stock"
    return fixed, "fixed_channel"


def reinitialize_backbone_(backbone):
    """Redraw a fixed-channel backbone's weights with detectron2's init rules for their shapes.

    The rules are those the stock constructors apply: ``c2_msra_fill`` for every conv of the
    bottom-up trunk (detectron2's ResNet; slim_det's MobileNet uses the same Kaiming fan-out
    normal), ``c2_xavier_fill`` for the FPN's own convs (laterals, outputs, top block); norms back
    to weight 1, bias 0 and fresh statistics.

    Args:
        backbone (nn.Module): a backbone holding no slimmable layer (e.g. built by
            ``build_fixed_channel_backbone``), a trunk or an FPN with ``bottom_up``.

    Returns:
        nn.Module: ``backbone`` itself.
    """
    trunk = getattr(backbone, "bottom_up", backbone)
    trunk_modules = {id(m) for m in trunk.modules()}
    for module in backbone.modules():
        if isinstance(module, SlimModule):
            raise ValueError("reinitialize_backbone_ expects a plain backbone; freeze it first.")
        if isinstance(module, nn.Conv2d):
            fill = weight_init.c2_msra_fill if id(module) in trunk_modules else \
                weight_init.c2_xavier_fill
            fill(module)
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
            # No detectron2 backbone has these; refuse rather than guess an init rule.
            raise ValueError(f"No init rule known for {type(module).__name__} in a backbone.")
    return backbone


def build_individual_model(cfg):
    """Build the fresh plain model of width MODEL.SLIM.INDIVIDUAL_WIDTH, tagged with its width.

    Its parameters are those of a plain detectron2 model with that width's channel counts; it is
    on ``cfg.MODEL.DEVICE`` in training mode, like ``build_model``'s.

    Returns:
        nn.Module: the model; ``model.individual_width`` is its `IndividualWidth` tag.
    """
    if individual_channels(cfg):
        model, kind = build_channel_model(cfg, individual_channels(cfg)), "channel configuration"
    else:
        plain_cfg, kind = individual_config(cfg)
        model = build_model(plain_cfg)
    if kind != "stock":
        reinitialize_backbone_(model.backbone)
    model.individual_width = IndividualWidth(individual_width(cfg))
    logging.getLogger(__name__).info(
        f"Individual model of width {individual_width(cfg):g} ({kind} config):\n{model}"
    )
    return model


def slim_architecture_config(cfg):
    """``cfg`` as the plain switchable slim model of width 1.0 (no individual, universal or
    distillation settings): the architecture that channel configurations are cut from."""
    inner = cfg.clone()
    inner.defrost()
    inner.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.0
    inner.MODEL.SLIM.INDIVIDUAL_CHANNELS = ""
    inner.MODEL.SLIM.MODE = "switchable"
    inner.MODEL.SLIM.SAMPLING = "uniform"  # per-group sampling is a universal training setting
    inner.MODEL.SLIM.WIDTHS = [1.0]
    inner.MODEL.SLIM.TEST_WIDTHS = []
    inner.MODEL.SLIM.DISTILL.ENABLED = False
    return inner


def build_channel_model(cfg, channels):
    """The plain model of a channel configuration: the slim model of ``cfg``, frozen at it.

    Every layer is a stock layer with exactly the configuration's channels (module names as in
    the slim model, norms under the stock names); its weights are the slim model's initial
    weights, sliced, until a checkpoint loads.

    Args:
        cfg (CfgNode): the slim model's config.
        channels (str or Mapping): a channel configuration or the path of its JSON file.

    Returns:
        nn.Module: the model, in training mode, on MODEL.DEVICE.
    """
    if isinstance(channels, str):
        channels = load_channels(channels)
    model = build_model(slim_architecture_config(cfg))
    set_channels(model, channels)
    side = max(64, 2 * model.backbone.size_divisibility)
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, side, side, generator=generator) * 255).to(model.pixel_mean.device)
    freeze_current_(model, [{"image": image}])
    return model.train()


class IndividualCheckpointer(SlimCheckpointer):
    """`SlimCheckpointer` that loads any checkpoint as the slimmable model uses it at width w.

    - a slimmable checkpoint's private norm of width w (``<norm>.private.w0_5.*``) replaces the
      full-width norm ``<norm>.*``; other widths' private norms are dropped;
    - a tensor whose shape is the full-width architecture's (width 1.0 of the same config) while
      the model's is narrower is cut to its leading slice.

    Any other shape mismatch (e.g. another number of classes) is left to detectron2, which skips
    the tensor with a warning as usual.
    """

    def __init__(self, model, save_dir="", *, cfg, **checkpointables):
        """
        Args:
            cfg (CfgNode): the individual model's config (MODEL.SLIM.INDIVIDUAL_WIDTH set).
            Other arguments: see `SlimCheckpointer`.
        """
        super().__init__(model, save_dir, **checkpointables)
        self._cfg = cfg
        self._full = None

    def _full_width_state(self):
        # The width-1.0 plain model of the same config has the same names; built once, on CPU.
        if self._full is None:
            cfg = slim_architecture_config(self._cfg)
            cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 1.0
            cfg.MODEL.DEVICE = "cpu"
            self._full = build_model(individual_config(cfg)[0]).state_dict()
        return self._full

    def _use_private_norms(self, state):
        # Before name matching: its heuristics would not match the private names.
        channels = individual_channels(self._cfg)
        name = (ChannelConfig(load_channels(channels)).name if channels
                else private_norm_name(individual_width(self._cfg)))
        mine = f".private.{name}."
        used = [k for k in state if mine in k]
        for key in used:
            state[key.replace(mine, ".")] = state[key]
        for key in [k for k in state if ".private." in k]:
            del state[key]
        if used:
            self.logger.info(f"Loaded {len(used)} tensors of the checkpoint's '{mine[1:-1]}' "
                             "private norms as this model's norms.")

    @staticmethod
    def _align(own, full, state, c2_conversion):
        """detectron2's name matching, for tensors of this model's shapes or the full-width ones.

        The heuristics drop a tensor whose shape differs from the matched model tensor's, so match
        against this model first (quietly: full-width tensors are expected to fail there), then
        the rest against the full-width model, whose tensors are sliced afterwards.
        """
        log = logging.getLogger(align_and_update_state_dicts.__module__)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            matched = align_and_update_state_dicts(own, state, c2_conversion=c2_conversion)
        finally:
            log.setLevel(level)
        # Without any match detectron2 returns the checkpoint unchanged: keep true matches only.
        narrow = {k: v for k, v in matched.items() if k in own and v.shape == own[k].shape}
        used = {id(v) for v in narrow.values()}
        rest = {k: v for k, v in state.items() if id(v) not in used}
        if not rest:
            return narrow
        return {**align_and_update_state_dicts(full, rest, c2_conversion=c2_conversion), **narrow}

    def _load_model(self, checkpoint):
        full = self._full_width_state()
        self._convert_ndarray_to_tensor(checkpoint["model"])
        self._use_private_norms(checkpoint["model"])
        own = self.model.state_dict()
        if checkpoint.get("matching_heuristics", False):
            c2 = checkpoint.get("__author__", None) == "Caffe2"
            checkpoint["model"] = self._align(own, full, checkpoint["model"], c2)
            checkpoint["matching_heuristics"] = False
        sliced = []
        for key, value in checkpoint["model"].items():
            if key not in own or key not in full or value.shape == own[key].shape:
                continue
            if value.shape == full[key].shape and value.dim() == own[key].dim() and all(
                    m <= c for m, c in zip(own[key].shape, value.shape)):
                checkpoint["model"][key] = value[tuple(slice(0, m) for m in own[key].shape)]
                sliced.append(key)
        if sliced:
            self.logger.info(
                f"Loaded {len(sliced)} full-width tensors as their leading slices at width "
                f"{individual_width(self._cfg):g} (e.g. {sliced[0]})."
            )
        return super()._load_model(checkpoint)


def make_checkpointer(cfg, model, save_dir="", **checkpointables):
    """An `IndividualCheckpointer` for an individual model's config, else a `SlimCheckpointer`.

    Either records what each load filled (``last_load``, see `slim_det.weights`).

    Args:
        cfg (CfgNode): the config the model was built from.
        model, save_dir, checkpointables: see `DetectionCheckpointer`.
    """
    if individual_width(cfg):
        return IndividualCheckpointer(model, save_dir, cfg=cfg, **checkpointables)
    return SlimCheckpointer(model, save_dir, **checkpointables)
