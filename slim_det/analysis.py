"""Per-width cost of a slimmable model: active parameters, FLOPs and latency."""
import statistics
import time

import torch
from torch import nn
from detectron2.utils.analysis import FlopCountAnalysis

from .layers import (
    SlimConv2d,
    SlimConvTranspose2d,
    SlimGroupNorm,
    SlimLinear,
    SwitchableNorm,
)
from .width import using_width

__all__ = [
    "active_parameter_count",
    "flops",
    "detector_costs",
    "latency_ms",
    "profile_widths",
]


def _used_parameters(module, inputs):
    """Number of parameters of ``module`` that one call on ``inputs`` reads."""
    channels = inputs[0].shape[1] if inputs and inputs[0].dim() > 1 else None
    bias = 0 if getattr(module, "bias", None) is None else 1
    if isinstance(module, SlimConv2d):
        out, in_per_group, _ = module.active_shape(channels)
        kh, kw = module.kernel_size
        return out * in_per_group * kh * kw + bias * out
    if isinstance(module, SlimConvTranspose2d):
        out = module.active_out(module.out_channels)
        kh, kw = module.kernel_size
        return channels * out * kh * kw + bias * out
    if isinstance(module, SlimLinear):
        out = module.active_out(module.out_features)
        return out * inputs[0].shape[-1] + bias * out
    if isinstance(module, SlimGroupNorm):
        return 2 * channels if module.affine else 0
    if isinstance(module, SwitchableNorm):
        if module.active_norm_name() in module.private:
            return 0  # the private (trained or calibrated) norm that runs counts itself
        if channels is not None and channels < module.num_features:  # the shared affine, sliced
            return sum(channels for p in module.parameters(recurse=False))
    return sum(p.numel() for p in module.parameters(recurse=False))


def active_parameter_count(model, inputs):
    """Count the parameters that a forward pass at the model's current width uses.

    A plain model built with that width's channel counts has exactly this many parameters. Layers
    called several times (RPN head on every level) count once; layers never called (other widths'
    private norms) do not count.

    Args:
        model (nn.Module): a detectron2 model, run in eval mode without gradients.
        inputs (list[dict]): detectron2 inputs for one forward pass.
    """
    used = {}

    def hook(module, args, _output):
        used[id(module)] = _used_parameters(module, args)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sum(used.values())


def flops(model, inputs):
    """Total FLOPs (fvcore counts one multiply-add as one FLOP) of one forward pass."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCountAnalysis(model, inputs)
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return counter.total()
    finally:
        model.train(was_training)


# The children of a detectron2 meta-architecture whose layers `_FixedCountRCNN` runs.
_COUNTED_PARTS = ("backbone", "proposal_generator", "roi_heads", "head", "sem_seg_head")


class _FixedCountRCNN(nn.Module):
    """A detector's layers run on inputs of fixed size: the cost no longer depends on what it
    detects.

    The backbone (with FPN) runs on one image, and on its features: the RPN head, RetinaNet's (or
    another dense detector's) head and the semantic segmentation head (Panoptic FPN,
    `SemanticSegmentor`), those the model has. ROI heads run on pooled ROIs: the box head and
    predictor (every stage of a cascade) on ``num_proposals``, the mask / keypoint heads on
    ``num_detections``. ROI pooling, NMS and post-processing are left out (fvcore does not count
    them either).

    Raises:
        NotImplementedError: the model has layers outside those parts (their cost is unknown).
    """

    def __init__(self, model, num_proposals, num_detections):
        super().__init__()
        unknown = [name for name, child in model.named_children()
                   if name not in _COUNTED_PARTS and any(True for _ in child.parameters())]
        if unknown:
            raise NotImplementedError(
                f"{type(model).__name__} has layers whose cost is not counted: {unknown}")
        self.model = model
        self.num_proposals = num_proposals
        self.num_detections = num_detections

    @staticmethod
    def _pooled(features, pooler, count):
        channels = features[0].shape[1]
        return features[0].new_zeros(count, channels, *pooler.output_size)

    def forward(self, image):
        model = self.model
        features = model.backbone(image)
        rpn = getattr(model, "proposal_generator", None)
        if rpn is not None:
            rpn.rpn_head([features[f] for f in rpn.in_features])
        outputs = []
        heads = getattr(model, "roi_heads", None)
        if heads is not None:
            outputs += self._roi_heads(heads, features)
        dense_head = getattr(model, "head", None)
        if dense_head is not None:  # RetinaNet's: (per-level logits, per-level box deltas)
            for per_level in dense_head([features[f] for f in model.head_in_features]):
                outputs += per_level
        sem_seg_head = getattr(model, "sem_seg_head", None)
        if sem_seg_head is not None:  # its layers; the upsampling to the image is post-processing
            outputs.append(sem_seg_head.layers(features))
        return tuple(outputs)

    def _roi_heads(self, heads, features):
        box_in = [features[f] for f in heads.box_in_features]
        pooled = self._pooled(box_in, heads.box_pooler, self.num_proposals)
        outputs = []
        if isinstance(heads.box_head, nn.ModuleList):
            # Cascade R-CNN: every stage runs on every proposal (refined by the stage before).
            for box_head, box_predictor in zip(heads.box_head, heads.box_predictor):
                outputs += box_predictor(box_head(pooled))
        else:
            outputs += heads.box_predictor(heads.box_head(pooled))
        for on, head, in_features, pooler in (
            (getattr(heads, "mask_on", False), "mask_head", "mask_in_features", "mask_pooler"),
            (getattr(heads, "keypoint_on", False), "keypoint_head", "keypoint_in_features",
             "keypoint_pooler"),
        ):
            if on:
                pooled = self._pooled([features[f] for f in getattr(heads, in_features)],
                                      getattr(heads, pooler), self.num_detections)
                outputs.append(getattr(heads, head).layers(pooled))
        return outputs


def detector_costs(model, image_size, num_proposals, num_detections):
    """GFLOPs and parameters of a detector at its current width, for fixed ROI counts.

    Counting a real forward pass makes the cost depend on how many boxes the model happens to
    detect (the mask head runs once per detection), so an untrained or collapsed model looks
    cheap. Here the heads always run on ``num_proposals`` / ``num_detections`` ROIs; dense heads
    (RetinaNet's, the semantic head of Panoptic FPN) on the whole image's features.

    Args:
        model (nn.Module): a detectron2 ``GeneralizedRCNN`` (standard or cascade ROI heads),
            ``PanopticFPN``, ``RetinaNet`` or ``SemanticSegmentor``, slimmable or not.
        image_size (tuple[int, int]): (height, width) of the padded input image.
        num_proposals (int): ROIs through the box head (e.g. MODEL.RPN.POST_NMS_TOPK_TEST).
        num_detections (int): ROIs through the mask / keypoint heads (e.g.
            TEST.DETECTIONS_PER_IMAGE).

    Returns:
        dict: ``gflops`` (whole detector), ``backbone_gflops`` (backbone + FPN) and ``params``.

    Raises:
        NotImplementedError: for a model with layers outside those parts.
    """
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, *image_size, device=device)
    fixed = _FixedCountRCNN(model, num_proposals, num_detections)
    return {
        "gflops": flops(fixed, (image,)) / 1e9,
        "backbone_gflops": flops(model.backbone, (image,)) / 1e9,
        "params": active_parameter_count(fixed, image),
    }


def latency_ms(model, inputs, warmup=2, repeats=5):
    """Median wall-clock milliseconds of ``model(inputs)`` in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(inputs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def profile_widths(model, inputs, widths, warmup=2, repeats=5, count_flops=True):
    """Parameters, GFLOPs and median latency of ``model`` at each width.

    Returns:
        list[dict]: one row per width (in the order given) with keys ``width``, ``params``,
        ``gflops`` (None when ``count_flops`` is False) and ``latency_ms``.
    """
    rows = []
    for width in widths:
        with using_width(model, width):
            rows.append(
                {
                    "width": float(width),
                    "params": active_parameter_count(model, inputs),
                    "gflops": flops(model, inputs) / 1e9 if count_flops else None,
                    "latency_ms": latency_ms(model, inputs, warmup, repeats),
                }
            )
    return rows
