"""Where a detectron2 R-CNN's inference time goes: its parts' wall-clock time and the top ops.

`PartTimer` times the parts of one ``model(inputs)`` call with forward hooks on the modules
(backbone, bottom-up network, RPN and its head, ROI heads and their poolers and heads) and by
wrapping the two non-module steps, ``preprocess_image`` and ``GeneralizedRCNN._postprocess``.
Hooks see every module call whatever the code path inside it, so the parts stay right when a
head's inference code changes; what no hook covers is reported as "other" (the meta-architecture's
own Python, moving tensors between steps). `op_profile` runs the model once more under
``torch.profiler`` for the op-level view: the most expensive ops and the calls of the ops that
tell the convolution paths and the copies apart.
"""
import contextlib
import time

import torch
from detectron2.modeling import GeneralizedRCNN

# The parts that add up to the whole call, in the order they run.
PARTS = ("preprocess", "backbone", "fpn", "rpn", "roi_heads", "postprocess", "other")
# Finer parts inside the RPN and the ROI heads (each also counted in its part above).
DETAILS = ("rpn_head", "rpn_proposals", "box_pooler", "box_head", "box_predictor", "mask_pooler",
           "mask_head", "keypoint_pooler", "keypoint_head", "roi_heads_other")
# Ops whose calls say which kernels ran: the two CPU convolution paths (PyTorch picks the native
# "slow" one for small inputs of batch 1), ROIAlign, NMS and the copies (contiguous(), cat...).
# A ROIAlign split over threads shows as one "parallel_roi_align" region (its own self time is
# its wall-clock time less the calling thread's part, which is a "roi_align" call).
COUNTED_OPS = {
    "roi_align": "torchvision::roi_align",
    "parallel_roi_align": "slim_det::parallel_roi_align",
    "nms": "torchvision::nms",
    "slow_conv2d": "aten::_slow_conv2d_forward",
    "mkldnn_conv": "aten::mkldnn_convolution",
    "cudnn_conv": "aten::cudnn_convolution",
    "copy_": "aten::copy_",
}


def _modules(model):
    """{key: module} of the parts of ``model`` that exist (a Faster R-CNN has no mask head)."""
    found = {"backbone_all": model.backbone}
    if hasattr(model.backbone, "bottom_up"):
        found["bottom_up"] = model.backbone.bottom_up
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None:
        found["rpn"] = rpn
        if hasattr(rpn, "rpn_head"):
            found["rpn_head"] = rpn.rpn_head
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        found["roi_heads"] = heads
        for kind in ("box", "mask", "keypoint"):
            for role in ("pooler", "head"):
                module = getattr(heads, f"{kind}_{role}", None)
                if isinstance(module, torch.nn.Module):
                    found[f"{kind}_{role}"] = module
        if isinstance(getattr(heads, "box_predictor", None), torch.nn.Module):
            found["box_predictor"] = heads.box_predictor
    return found


class PartTimer:
    """Accumulates the wall-clock seconds of a model's parts while `active`.

    Args:
        model (GeneralizedRCNN): the detector.
        device (str): its device; on CUDA every boundary synchronizes, so that a part's time is
            its kernels' and not the launch's.
    """

    def __init__(self, model, device):
        self.model = model
        self.cuda = str(device).startswith("cuda")
        self.seconds = {}
        self._starts = {}

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, key):
        self._starts.setdefault(key, []).append(self._now())

    def _stop(self, key):
        elapsed = self._now() - self._starts[key].pop()
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed

    def _timed(self, key, fn):
        def wrapper(*args, **kwargs):
            self._start(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stop(key)
        return wrapper

    @contextlib.contextmanager
    def active(self):
        """Hooks in place for the block; removed (and the patched functions restored) after."""
        handles = []
        for key, module in _modules(self.model).items():
            handles.append(module.register_forward_pre_hook(lambda *_, k=key: self._start(k)))
            handles.append(module.register_forward_hook(lambda *_, k=key: self._stop(k)))
        # GeneralizedRCNN.inference calls the class's static _postprocess by name, so the timed
        # wrapper must replace it on the class for the block; preprocess_image is called on self.
        postprocess = GeneralizedRCNN.__dict__["_postprocess"]
        GeneralizedRCNN._postprocess = staticmethod(self._timed("postprocess", postprocess.__func__))
        self.model.preprocess_image = self._timed("preprocess", type(self.model).preprocess_image
                                                  .__get__(self.model))
        try:
            yield self
        finally:
            GeneralizedRCNN._postprocess = postprocess
            del self.model.preprocess_image
            for handle in handles:
                handle.remove()

    def run(self, inputs):
        """One timed ``model(inputs)``: {part or detail: milliseconds}, with "total"."""
        self.seconds, self._starts = {}, {}
        with self.active(), torch.no_grad():
            start = self._now()
            self.model(inputs)
            total = self._now() - start
        return split_parts(self.seconds, total)


def split_parts(seconds, total):
    """The raw hook times (seconds) as `PARTS` and `DETAILS` in milliseconds."""
    s = {key: seconds.get(key, 0.0) for key in set(seconds) | {
        "backbone_all", "bottom_up", "rpn", "rpn_head", "roi_heads", "preprocess", "postprocess"}}
    bottom_up = s["bottom_up"] if "bottom_up" in seconds else s["backbone_all"]
    ms = {
        "preprocess": s["preprocess"],
        "backbone": bottom_up,
        "fpn": s["backbone_all"] - bottom_up,
        "rpn": s["rpn"],
        "roi_heads": s["roi_heads"],
        "postprocess": s["postprocess"],
    }
    ms["other"] = total - sum(ms.values())
    ms["rpn_head"] = s["rpn_head"]
    ms["rpn_proposals"] = s["rpn"] - s["rpn_head"]  # anchors, box decoding, top-k and NMS
    inside = 0.0
    for key in DETAILS[2:-1]:
        ms[key] = s.get(key, 0.0)
        inside += ms[key]
    # Box inference (score filter, per-class NMS), level assignment, pasting results together.
    ms["roi_heads_other"] = s["roi_heads"] - inside
    ms["total"] = total
    return {key: value * 1000.0 for key, value in ms.items()}


def op_profile(model, inputs, device, runs=1, top=15):
    """The op-level view of ``runs`` calls of ``model(inputs)`` (per call).

    Returns:
        dict: ``top``: the ``top`` ops by self time (name, calls, self_ms, share of all self
        time); ``calls``: calls of each of `COUNTED_OPS`; ``self_ms``: their self time.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = str(device).startswith("cuda")
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(runs):
            model(inputs)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(event):
        if cuda:
            return getattr(event, "self_device_time_total", 0.0) + event.self_cpu_time_total
        return event.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    by_name = {e.key: e for e in events}
    return {
        "top": [{"name": e.key, "calls": e.count / runs, "self_ms": self_us(e) / 1000.0 / runs,
                 "share": self_us(e) / total} for e in ranked],
        "calls": {k: (by_name[n].count / runs if n in by_name else 0)
                  for k, n in COUNTED_OPS.items()},
        "self_ms": {k: (self_us(by_name[n]) / 1000.0 / runs if n in by_name else 0.0)
                    for k, n in COUNTED_OPS.items()},
    }
