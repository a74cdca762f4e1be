"""ROIAlign whose CPU backward runs on every intra-op thread instead of one.

torchvision's CPU ``roi_align`` backward is a single-threaded loop over ROIs, channels, bins and
sampling points; in a slimmable training step (every width, box and mask poolers) it was about 30%
of the time on 2 cores, with the other core idle. Channels are independent in ROIAlign, so the
backward here splits them into ``torch.get_num_threads()`` groups and runs torchvision's own
backward kernel on each group in a thread (the op releases the GIL). The forward and every
gradient value are torchvision's, bit for bit (tested).
"""
from concurrent.futures import ThreadPoolExecutor

import torch
from detectron2.layers import ROIAlign
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align

__all__ = ["ParallelBackwardROIAlign", "use_parallel_roi_align_backward_"]

_POOL = {}


def _pool(workers):
    if workers not in _POOL:
        _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="roi_align_backward")
    return _POOL[workers]


class _ParallelBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.settings = (_pair(output_size), spatial_scale, sampling_ratio, aligned)
        ctx.input_shape = input.shape
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned = ctx.settings
        num_images, channels, height, width = ctx.input_shape
        groups = max(1, min(torch.get_num_threads(), channels))

        def backward_of(channel_slice):
            grad = grad_output[:, channel_slice].contiguous()
            return torch.ops.torchvision._roi_align_backward(
                grad, rois, spatial_scale, pooled_h, pooled_w, num_images, grad.shape[1],
                height, width, sampling_ratio, aligned,
            )

        bounds = [channels * g // groups for g in range(groups + 1)]
        slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        if groups == 1:
            grad_input = backward_of(slices[0])
        else:
            grad_input = torch.cat(list(_pool(groups).map(backward_of, slices)), dim=1)
        return grad_input, None, None, None, None, None


class ParallelBackwardROIAlign(ROIAlign):
    """detectron2's `ROIAlign` with the multi-threaded CPU backward described above.

    On other devices, or when no gradient is needed, it is exactly detectron2's `ROIAlign`.
    """

    def forward(self, input, rois):
        if input.device.type != "cpu" or not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input, rois)
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"rois must have shape (R, 5); got {tuple(rois.shape)}.")
        return _ParallelBackward.apply(
            input, rois.to(dtype=input.dtype), self.output_size, self.spatial_scale,
            self.sampling_ratio, self.aligned,
        )


def use_parallel_roi_align_backward_(model):
    """Replace every detectron2 `ROIAlign` in ``model`` by a `ParallelBackwardROIAlign`.

    Returns:
        int: how many were replaced.
    """
    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is ROIAlign:
                setattr(module, name, ParallelBackwardROIAlign(
                    child.output_size, child.spatial_scale, child.sampling_ratio, child.aligned
                ))
                replaced += 1
    return replaced
