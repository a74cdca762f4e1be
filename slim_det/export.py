"""Export one width of a slimmable detector as a plain detectron2 model.

The exported model has the channel counts of that width, its tensors physically sliced (each
switchable norm becomes that width's private norm under the stock names), and computes the same
outputs as the slim model at that width. Two forms exist:

- "stock": a ResNet-50/101(-FPN) at a width whose channel counts follow detectron2's own config
  formulas, in any meta-architecture slim_det builds (R-CNN, Cascade R-CNN, RetinaNet, Panoptic
  FPN). The config uses only stock detectron2 keys (stock meta-architecture and heads, head dims
  narrowed under scope "all") and loads without ``import slim_det``.
- "fixed_channel": anything else (ResNet-18/34, MobileNet, odd widths, Panoptic FPN's semantic
  head slimmed with GroupNorm). The backbone is ``build_fixed_channel_backbone`` (see
  `slim_det.modeling.plain`); the heads are stock, but for a slimmed semantic head, which is
  ``build_fixed_channel_sem_seg_head``.

Typical use::

    plain_cfg, plain_model, kind = export_width(model, cfg, 0.5)
    save_exported(plain_cfg, plain_model, "out/w0.5")
    cfg, model = load_exported("out/w0.5")
"""
import copy
import logging
import os
import warnings
from collections.abc import Mapping

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.export import TracingAdapter
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.meta_arch import GeneralizedRCNN, PanopticFPN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector

from .calibration import widths_without_statistics
from .channels import ChannelConfig, set_channels
from .config import (
    add_slim_config,
    check_runnable_width,
    fpn_min_width,
    individual_channels,
    rpn_post_nms_topk_at,
    rpn_post_nms_topk_test,
    slim_settings,
)
from .inputs import InputError
from .layers import SlimGroupNorm, SwitchableNorm, private_norm_name
from .modeling.plain import add_fixed_channel_config, freeze_width_
from .roi_align import use_parallel_roi_align_
from .weights import load_weights
from .width import active_channels, check_width, using_width

__all__ = [
    "exported_config",
    "export_width",
    "export_channels",
    "plain_state_dict",
    "save_exported",
    "load_exported",
    "max_output_difference",
    "verify_export",
    "trace_detector",
    "export_torchscript",
    "export_onnx",
]

logger = logging.getLogger(__name__)

STOCK_BACKBONES = {
    "build_slim_resnet_fpn_backbone": "build_resnet_fpn_backbone",
    "build_slim_resnet_backbone": "build_resnet_backbone",
    "build_slim_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_fpn_backbone",
}
# Each slim name (meta-architecture, head) and the stock detectron2 name of the same model.
STOCK_META_ARCHITECTURES = {"SlimRetinaNet": "RetinaNet"}
STOCK_PROPOSAL_GENERATORS = {"SlimRPN": "RPN"}
STOCK_RPN_HEADS = {"SlimRPNHead": "StandardRPNHead"}
STOCK_ROI_HEADS = {"SlimStandardROIHeads": "StandardROIHeads",
                   "SlimCascadeROIHeads": "CascadeROIHeads"}
STOCK_SEM_SEG_HEADS = {"SlimSemSegFPNHead": "SemSegFPNHead"}
CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model_final.pth"


def _copy_known_keys(source, target, prefix=""):
    """Copy every key of ``source`` that ``target`` has; return the names of the others."""
    dropped = []
    for key, value in source.items():
        name = prefix + key
        if key not in target:
            dropped.append(name)
        elif isinstance(value, CfgNode) and isinstance(target[key], CfgNode):
            dropped += _copy_known_keys(value, target[key], name + ".")
        else:
            target[key] = copy.deepcopy(value)
    return dropped


def _set_plain_heads(plain, cfg, width, divisor, scope, narrow_fpn):
    m = plain.MODEL
    m.META_ARCHITECTURE = STOCK_META_ARCHITECTURES.get(m.META_ARCHITECTURE, m.META_ARCHITECTURE)
    m.RPN.HEAD_NAME = STOCK_RPN_HEADS.get(m.RPN.HEAD_NAME, m.RPN.HEAD_NAME)
    if m.PROPOSAL_GENERATOR.NAME in STOCK_PROPOSAL_GENERATORS:
        # The width's own proposal count becomes the plain model's.
        m.RPN.POST_NMS_TOPK_TEST = rpn_post_nms_topk_at(
            rpn_post_nms_topk_test(cfg), width, cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
        m.PROPOSAL_GENERATOR.NAME = STOCK_PROPOSAL_GENERATORS[m.PROPOSAL_GENERATOR.NAME]
        if "SLIM" in m:
            m.SLIM.RPN_POST_NMS_TOPK_TEST = []
    m.ROI_HEADS.NAME = STOCK_ROI_HEADS.get(m.ROI_HEADS.NAME, m.ROI_HEADS.NAME)
    m.SEM_SEG_HEAD.NAME = STOCK_SEM_SEG_HEADS.get(m.SEM_SEG_HEAD.NAME, m.SEM_SEG_HEAD.NAME)
    if scope != "all":
        return

    def narrow(channels):
        return active_channels(channels, width, divisor)

    src = cfg.MODEL
    # With scope "all" each head's layers slim uniformly, so one narrowed dim per key says it all.
    # RetinaNet's subnet convs are as wide as the FPN (floor included): no key of their own.
    if narrow_fpn:  # a fixed-channel backbone builds the full FPN, then freezes it
        fpn_width = max(width, fpn_min_width(cfg))
        m.FPN.OUT_CHANNELS = active_channels(src.FPN.OUT_CHANNELS, fpn_width, divisor)
    m.RPN.CONV_DIMS = [c if c == -1 else narrow(c) for c in src.RPN.CONV_DIMS]
    m.ROI_BOX_HEAD.CONV_DIM = narrow(src.ROI_BOX_HEAD.CONV_DIM)
    m.ROI_BOX_HEAD.FC_DIM = narrow(src.ROI_BOX_HEAD.FC_DIM)
    m.ROI_MASK_HEAD.CONV_DIM = narrow(src.ROI_MASK_HEAD.CONV_DIM)
    m.ROI_KEYPOINT_HEAD.CONV_DIMS = tuple(narrow(c) for c in src.ROI_KEYPOINT_HEAD.CONV_DIMS)
    m.SEM_SEG_HEAD.CONVS_DIM = narrow(src.SEM_SEG_HEAD.CONVS_DIM)


def _stock_config(cfg, width, divisor, scope):
    """Stock-keys config of ``width``, or None if stock detectron2 cannot express the backbone."""
    name = cfg.MODEL.BACKBONE.NAME
    resnets = cfg.MODEL.RESNETS
    if name not in STOCK_BACKBONES or (width < 1.0 and resnets.DEPTH in (18, 34)):
        return None  # stock R18/R34 assert RES2_OUT_CHANNELS == 64
    plain = get_cfg()
    dropped = _copy_known_keys(cfg, plain)
    dropped = [k for k in dropped if not k.startswith(("MODEL.SLIM", "MODEL.MOBILENET"))]
    if dropped:
        logger.warning(f"Keys unknown to stock detectron2, left out of the export: {dropped}")
    plain.MODEL.BACKBONE.NAME = STOCK_BACKBONES[name]
    for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS", "WIDTH_PER_GROUP"):
        plain.MODEL.RESNETS[key] = active_channels(resnets[key], width, divisor)
    _set_plain_heads(plain, cfg, width, divisor, scope, narrow_fpn=True)
    return plain


def _fixed_channel_config(cfg, width, divisor, scope):
    plain = cfg.clone()
    plain.defrost()
    add_fixed_channel_config(plain)
    plain.MODEL.FIXED_CHANNEL.BACKBONE = cfg.MODEL.BACKBONE.NAME
    plain.MODEL.FIXED_CHANNEL.WIDTH = width
    plain.MODEL.BACKBONE.NAME = "build_fixed_channel_backbone"
    # MODEL.SLIM now only describes the architecture being frozen: one private norm is enough,
    # whatever mode the slim model trained in (a universal model's width exports the same way).
    plain.MODEL.SLIM.MODE = "switchable"
    plain.MODEL.SLIM.SAMPLING = "uniform"  # per-group sampling is a universal training setting
    plain.MODEL.SLIM.WIDTHS = sorted({width, 1.0})
    plain.MODEL.SLIM.TEST_WIDTHS = []
    plain.MODEL.SLIM.DISTILL.ENABLED = False
    _set_plain_heads(plain, cfg, width, divisor, scope, narrow_fpn=False)
    if scope == "all" and cfg.MODEL.SEM_SEG_HEAD.NAME in STOCK_SEM_SEG_HEADS:
        # The semantic head is frozen from the slim one (see _stock_heads_differ).
        plain.MODEL.FIXED_CHANNEL.SEM_SEG_HEAD = cfg.MODEL.SEM_SEG_HEAD.NAME
        plain.MODEL.SEM_SEG_HEAD.NAME = "build_fixed_channel_sem_seg_head"
        plain.MODEL.SEM_SEG_HEAD.CONVS_DIM = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    return plain


def _model_device(model):
    return next(model.parameters()).device


def _backbone_signature(backbone):
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    groups = {n: m.num_groups for n, m in backbone.named_modules() if hasattr(m, "num_groups")}
    return shapes, groups


def _stock_matches(model, stock_cfg, width):
    """Whether the stock backbone of ``stock_cfg`` has exactly the slim backbone's frozen layers."""
    frozen = copy.deepcopy(model.backbone)
    side = max(64, 2 * frozen.size_divisibility)
    sample = torch.zeros(1, 3, side, side, device=_model_device(model))
    freeze_width_(frozen, width, sample)
    stock_cfg = stock_cfg.clone()
    stock_cfg.defrost()
    stock_cfg.MODEL.DEVICE = "cpu"
    return _backbone_signature(frozen) == _backbone_signature(build_backbone(stock_cfg))


def exported_config(model, cfg, width):
    """The config of the plain model of ``width``, and its kind ("stock" or "fixed_channel").

    Args:
        model (nn.Module): the slim model built from ``cfg`` (its backbone decides whether stock
            config keys reproduce the channel counts exactly).
        cfg (CfgNode): the slim model's config.
        width (float): any width at which ``model`` has batch-norm statistics: a trained width,
            or a calibrated one (any width inside WIDTH_RANGE in universal mode).

    Returns:
        tuple(CfgNode, str): the config (MODEL.WEIGHTS not yet set) and its kind.
    """
    _, scope, divisor = slim_settings(cfg)
    width = check_runnable_width(cfg, width)
    if widths_without_statistics(model, [width]):
        raise ValueError(
            f"Width {width:g} has no batch-norm statistics in this model (neither trained nor "
            "calibrated), so there is nothing to export for its norms. Calibrate it first: "
            "tools/export_width.py does so on TEST.CALIBRATION_IMAGES training images; or "
            "slim_det.calibrate_norms, or tools/calibrate.py."
        )
    stock = _stock_config(cfg, width, divisor, scope)
    if (stock is not None and not _slim_group_norms(model, width, "sem_seg_head.")
            and _stock_matches(model, stock, width)):
        return stock, "stock"
    return _fixed_channel_config(cfg, width, divisor, scope), "fixed_channel"


# The config key of each head's norm, named when a slimmed GroupNorm there cannot be exported.
HEAD_NORM_KEYS = {"head.": "MODEL.RETINANET.NORM", "roi_heads.box_head": "MODEL.ROI_BOX_HEAD.NORM",
                  "roi_heads.mask_head": "MODEL.ROI_MASK_HEAD.NORM",
                  "roi_heads.keypoint_head": "MODEL.ROI_KEYPOINT_HEAD.NORM",
                  "proposal_generator.": "MODEL.RPN.NORM"}


def _slim_group_norms(model, width, prefix):
    """Names of the slimmed GroupNorms under ``prefix`` that run narrower than full at ``width``.

    A slim GroupNorm keeps the full layer's channels per group, a stock one keeps 32 groups, so
    a stock layer of the narrow width would normalise differently.
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, SlimGroupNorm) and name.startswith(prefix) and width < 1]


def _check_heads_exportable(model, width):
    # The semantic head has a fixed-channel form (build_fixed_channel_sem_seg_head); the others
    # are stock heads with narrowed dims, which cannot hold a slim GroupNorm.
    for name in _slim_group_norms(model, width, ""):
        if name.startswith(("backbone.", "sem_seg_head.")):
            continue
        key = next((k for p, k in HEAD_NORM_KEYS.items() if name.startswith(p)), "its NORM key")
        raise ValueError(
            f"Cannot export '{name}' at width {width:g}: a slimmed GroupNorm in the heads keeps "
            "its channels per group, which detectron2's stock heads (32 groups) cannot express. "
            f"Train with {key} '' (no norm) or a batch norm the head accepts, or with "
            "MODEL.SLIM.SCOPE 'backbone'; or export width 1.0."
        )


def plain_state_dict(model, width, shapes):
    """The slim model's tensors at ``width`` (or a channel configuration), sliced to a plain
    model's shapes.

    Every slimmable layer uses a leading slice of its full tensors, so each plain tensor is the
    leading slice of the same-named slim tensor; switchable norms contribute the norm that runs
    at ``width``: its private norm (trained or calibrated) if it has one, else the full norm.

    Args:
        model (nn.Module): the slim model.
        width (float or Mapping): the exported width, or channel configuration (whose
            calibrated private norms are used).
        shapes (dict[str, torch.Size]): the plain model's state-dict shapes.

    Returns:
        dict[str, Tensor]: the plain model's state dict (new tensors, not views).

    Raises:
        ValueError: if the plain model's keys or shapes do not fit the slim model's.
    """
    source = model.state_dict()
    norm_name = (ChannelConfig(width).name if isinstance(width, Mapping)
                 else private_norm_name(width))
    for name, module in model.named_modules():
        if not isinstance(module, SwitchableNorm):
            continue
        prefix = f"{name}.private."
        source = {k: v for k, v in source.items() if not k.startswith(prefix)}
        # A universal model's width 1.0 runs a calibrated private norm too.
        if norm_name in module.private:
            private = module.private[norm_name].state_dict()
            source.update({f"{name}.{k}": v for k, v in private.items()})
    missing = sorted(set(shapes) - set(source))
    unused = sorted(set(source) - set(shapes))
    if missing or unused:
        raise ValueError(
            f"The plain model does not match the slim model: keys only in the plain model "
            f"{missing[:5]}, keys only in the slim model {unused[:5]}."
        )
    state = {}
    for key, shape in shapes.items():
        value = source[key]
        if value.dim() != len(shape) or any(p > s for p, s in zip(shape, value.shape)):
            raise ValueError(
                f"'{key}' has shape {tuple(shape)} in the plain model but {tuple(value.shape)} "
                "in the slim model; a plain tensor must be a leading slice of the slim one."
            )
        state[key] = value[tuple(slice(0, size) for size in shape)].clone()
    return state


def export_width(model, cfg, width):
    """Build the plain detectron2 model of one width of a slim model.

    Args:
        model (nn.Module): a slim detectron2 model built from ``cfg``, weights loaded.
        cfg (CfgNode): its config.
        width (float): the width to export; ``model`` must have batch-norm statistics for it
            (trained or calibrated), see `exported_config`.

    Returns:
        tuple(CfgNode, nn.Module, str): the plain config, the plain model (same device and mode
        as ``model``) and the kind of export ("stock" or "fixed_channel"). Its ROIAligns are
        `ParallelROIAlign` like the slim model's (same results, the saved files stay stock).
    """
    width = check_width(width)
    _check_heads_exportable(model, width)
    plain_cfg, kind = exported_config(model, cfg, width)
    plain_cfg.MODEL.DEVICE = str(_model_device(model))
    plain = build_model(plain_cfg)
    use_parallel_roi_align_(plain)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(plain_state_dict(model, width, shapes))
    plain.train(model.training)
    return plain_cfg, plain, kind


def export_channels(model, cfg, channels, channels_file):
    """Build the plain model of a channel configuration of a slim model (see `slim_det.channels`).

    The plain model has exactly the configuration's channels and computes what the slim model
    computes at it. Its config is ``cfg`` with MODEL.SLIM.INDIVIDUAL_CHANNELS naming
    ``channels_file``, so `load_exported` and ``tools/train_net.py`` (evaluation, training from
    scratch or fine-tuning) build it again.

    Args:
        model (nn.Module): the slim model, with batch-norm statistics for the configuration
            (`slim_det.calibrate_norms`), unless it has no batch norm.
        cfg (CfgNode): its config.
        channels (Mapping): the configuration (group -> channels).
        channels_file (str): where the configuration is (or will be) saved as JSON.

    Returns:
        tuple(CfgNode, nn.Module): the plain config and model (same device and mode as ``model``).

    Raises:
        ValueError: if the configuration has no statistics in ``model``.
    """
    from .individual import build_channel_model  # individual imports this module

    config = set_channels(model, channels)
    norms = [n for n in model.modules() if isinstance(n, SwitchableNorm)]
    if norms and any(config.name not in n.private for n in norms):
        raise ValueError(
            f"Channel configuration {config.name} has no batch-norm statistics in this model: "
            "calibrate it first (slim_det.calibrate_norms(model, loader, [config], n); "
            "tools/export_width.py --channels does so on TEST.CALIBRATION_IMAGES images)."
        )
    plain_cfg = cfg.clone()
    plain_cfg.defrost()
    plain_cfg.MODEL.SLIM.INDIVIDUAL_CHANNELS = os.path.abspath(channels_file)
    plain_cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.0
    plain_cfg.MODEL.DEVICE = str(_model_device(model))
    plain = build_channel_model(plain_cfg, config)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(plain_state_dict(model, config, shapes))
    plain.train(model.training)
    return plain_cfg, plain


def save_exported(plain_cfg, plain_model, output_dir):
    """Write ``config.yaml`` and ``model_final.pth`` (tensors on CPU) into ``output_dir``.

    The config's MODEL.WEIGHTS points at the written checkpoint (absolute path), so
    ``DefaultPredictor(cfg)`` loads it as it is.

    Returns:
        tuple(str, str): the config and checkpoint paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    weights = os.path.abspath(os.path.join(output_dir, WEIGHTS_FILE))
    config = os.path.join(output_dir, CONFIG_FILE)
    cfg = plain_cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    state = {k: v.detach().cpu() for k, v in plain_model.state_dict().items()}
    torch.save({"model": state}, weights)
    with open(config, "w") as f:
        f.write(cfg.dump())
    return config, weights


def load_exported(path, device=None):
    """Load an exported model (either kind) with slim_det's config keys available.

    A "stock" export also loads with plain detectron2: ``get_cfg()``, ``merge_from_file``,
    ``build_model`` and ``DetectionCheckpointer``.

    Args:
        path (str): the export directory or its ``config.yaml``.
        device (str or None): overrides MODEL.DEVICE.

    Returns:
        tuple(CfgNode, nn.Module): the config and the model, in eval mode (its ROIAligns
        multi-threaded on CPU: `slim_det.roi_align.ParallelROIAlign`).

    Raises:
        slim_det.weights.IncompatibleCheckpointError: when the weights leave a tensor unloaded.
    """
    config = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
    cfg = add_fixed_channel_config(add_slim_config(get_cfg()))
    cfg.merge_from_file(config)
    if device is not None:
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    if individual_channels(cfg):
        from .individual import build_channel_model  # individual imports this module

        model = build_channel_model(cfg, individual_channels(cfg))
    else:
        model = build_model(cfg)
    use_parallel_roi_align_(model)
    load_weights(cfg, model)  # an export whose weights do not fit its config is refused
    return cfg, model.eval()


def _instances(output):
    return output["instances"] if isinstance(output, dict) else output


def _dense_difference(a, b):
    """Largest difference of the semantic / panoptic outputs of one image (dicts), if any."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return 0.0
    if set(a) != set(b):
        return float("inf")
    largest = 0.0
    if "sem_seg" in a:
        largest = (a["sem_seg"] - b["sem_seg"]).abs().max().item()
    if "panoptic_seg" in a:
        (ids_a, info_a), (ids_b, info_b) = a["panoptic_seg"], b["panoptic_seg"]
        # Segment ids are labels, not values: any difference is a different output.
        if not torch.equal(ids_a, ids_b) or info_a != info_b:
            return float("inf")
    return largest


def max_output_difference(outputs_a, outputs_b):
    """Largest absolute difference between two lists of detectron2 outputs.

    Compares every tensor field (boxes, scores, classes, masks, keypoints) of the ``Instances``
    image by image, and the ``sem_seg`` logits and ``panoptic_seg`` of a segmentation model.

    Returns:
        float: the largest difference; ``inf`` when the detections differ in number or fields, or
        the panoptic segments differ.
    """
    largest = 0.0
    for a, b in zip(outputs_a, outputs_b):
        largest = max(largest, _dense_difference(a, b))
        if isinstance(a, dict) and "instances" not in a:
            continue  # a semantic segmentor's output
        a, b = _instances(a), _instances(b)
        if len(a) != len(b) or set(a.get_fields()) != set(b.get_fields()):
            return float("inf")
        for name in a.get_fields():
            x, y = a.get(name), b.get(name)
            x, y = getattr(x, "tensor", x), getattr(y, "tensor", y)
            if x.numel():
                largest = max(largest, (x.float() - y.float()).abs().max().item())
    return largest


def verify_export(model, plain_model, width, inputs):
    """Compare the slim model at ``width`` with its exported plain model on ``inputs``.

    Args:
        model (nn.Module): the slim model.
        plain_model (nn.Module): the model returned by `export_width`.
        width (float): the exported width.
        inputs (list[dict]): detectron2 inputs.

    Returns:
        dict: ``features``: the largest backbone-feature difference relative to the feature's
        largest magnitude; ``outputs``: the largest absolute difference of the final detections
        (see `max_output_difference`).
    """
    modes = model.training, plain_model.training
    model.eval()
    plain_model.eval()
    try:
        with torch.no_grad(), using_width(model, width):
            images = model.preprocess_image(inputs).tensor
            slim_features, plain_features = model.backbone(images), plain_model.backbone(images)
            features = max(
                ((slim_features[k] - plain_features[k]).abs().max()
                 / slim_features[k].abs().max().clamp(min=1e-12)).item()
                for k in slim_features
            )
            outputs = max_output_difference(model(inputs), plain_model(inputs))
    finally:
        model.train(modes[0])
        plain_model.train(modes[1])
    return {"features": features, "outputs": outputs}


def _inference_without_postprocess(model, inputs):
    """The network's outputs before postprocessing (rescaling, mask pasting, panoptic merging:
    data-dependent python that tracing cannot cover), per image."""
    # PanopticFPN first: it subclasses GeneralizedRCNN.
    if isinstance(model, PanopticFPN):  # instances and semantic logits; no panoptic merging
        instances, sem_seg = model.inference(inputs, do_postprocess=False)
        return [{"instances": i, "sem_seg": s} for i, s in zip(instances, sem_seg)]
    if isinstance(model, GeneralizedRCNN):  # Faster / Mask / Keypoint / Cascade R-CNN
        return model.inference(inputs, do_postprocess=False)
    if isinstance(model, DenseDetector):  # RetinaNet: its forward_inference, without forward's
        images = model.preprocess_image(inputs)  # postprocessing
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        return model.forward_inference(images, features, model.head(features))
    raise InputError(
        f"A traced export (--format torchscript / onnx) supports GeneralizedRCNN (Faster, Mask, "
        f"Keypoint, Cascade R-CNN), RetinaNet and PanopticFPN models; this model is a "
        f"{type(model).__name__}. Export without --format and load the checkpoint with "
        "detectron2's DetectionCheckpointer."
    )


def trace_detector(model, image):
    """TorchScript-trace a plain detectron2 detector with detectron2's `TracingAdapter`.

    The traced module takes the image tensor and returns the flattened fields of the
    un-postprocessed outputs: ``Instances`` (boxes in the input image's coordinates, masks as
    28x28 logits per detection) of an R-CNN or RetinaNet, and for Panoptic FPN one dict per image
    of those ``instances`` and the ``sem_seg`` logits (the panoptic merge is postprocessing);
    ``adapter.outputs_schema`` turns them back.

    Args:
        model (nn.Module): a plain detectron2 model in eval mode.
        image (Tensor): one (C, H, W) image, in the model's input format and value range.

    Returns:
        tuple(torch.jit.ScriptModule, TracingAdapter)
    """
    # An adapter starts in train mode; exporters restore that mode onto the model afterwards.
    adapter = TracingAdapter(model, [{"image": image}], _inference_without_postprocess).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # detectron2 is written to trace correctly at a fixed input size; its python branches on
        # tensor values warn all the same.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def _without_sem_seg(output):
    return {k: v for k, v in output.items() if k != "sem_seg"} if isinstance(output, dict) \
        else output


def _check_traced(outputs, expected, atol, what):
    """The largest difference between traced and eager outputs, or an error beyond ``atol``.

    Detections are compared absolutely; Panoptic FPN's semantic logits relative to their largest
    magnitude (at least 1), since their float rounding grows with them (a random model's reach
    tens).
    """
    difference = max_output_difference([_without_sem_seg(o) for o in outputs],
                                       [_without_sem_seg(e) for e in expected])
    for out, exp in zip(outputs, expected):
        if isinstance(exp, dict) and "sem_seg" in exp:
            scale = exp["sem_seg"].abs().max().clamp(min=1.0)
            difference = max(difference,
                             ((out["sem_seg"] - exp["sem_seg"]).abs().max() / scale).item())
    if not difference <= atol:
        raise RuntimeError(
            f"The {what} model's outputs differ from the eager model's by {difference:g} "
            f"(tolerance {atol:g})."
        )
    return difference


def export_torchscript(model, image, path, atol=1e-3):
    """Trace ``model`` on ``image``, save it to ``path`` and check it against eager outputs.

    Returns:
        float: the largest output difference between the traced and the eager model (see
        `_check_traced`).
    """
    model.eval()
    traced, adapter = trace_detector(model, image)
    with torch.no_grad():
        expected = _inference_without_postprocess(model, [{"image": image}])
        outputs = adapter.outputs_schema(traced(*adapter.flattened_inputs))
    difference = _check_traced(outputs, expected, atol, "TorchScript")
    torch.jit.save(traced, path)
    return difference


def export_onnx(model, image, path, atol=1e-3):
    """Export ``model`` to ONNX via the `TracingAdapter` and check it with onnxruntime.

    Returns:
        float: the largest output difference between ONNX Runtime and the eager model.

    Raises:
        ImportError: if ``onnx`` or ``onnxruntime`` is not installed.
    """
    import onnxruntime  # noqa: F401 -- fail before the slow export, not after

    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], _inference_without_postprocess).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # see trace_detector
        torch.onnx.export(
            adapter, tuple(adapter.flattened_inputs), path, dynamo=False, opset_version=17
        )
        expected = _inference_without_postprocess(model, [{"image": image}])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.cpu().numpy() for name, t in zip(names, adapter.flattened_inputs)}
    flat = tuple(torch.from_numpy(x) for x in session.run(None, feeds))
    outputs = adapter.outputs_schema(flat)
    on_device = [{k: v.to(image.device) for k, v in o.items()} if isinstance(o, dict)
                 else o.to(image.device) for o in outputs]  # Panoptic FPN's are dicts
    return _check_traced(on_device, expected, atol, "ONNX")
