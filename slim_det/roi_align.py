"""ROIAlign whose CPU forward and backward run on every intra-op thread instead of one.

torchvision's CPU ``roi_align`` kernels are single-threaded loops over ROIs, channels, bins and
sampling points. In a slimmable training step (every width, box and mask poolers) the backward
was about 30% of the time on 2 cores, with the other core idle; in inference the forward is a
fifth of a narrow shapes detector's time. Both split the work over ``torch.get_num_threads()``
threads that each run torchvision's own kernel (the ops release the GIL):

- the forward splits the ROIs: every output row depends on its ROI alone, the feature map is
  shared read-only, and each part is sized by its sampling points (the kernel's cost), so the
  threads finish together;
- the backward splits the channels: ROIs scatter into shared gradient pixels, channels do not.

Every output and gradient value is torchvision's, bit for bit (tested). Under tracing, scripting
or compilation (exports, FLOP counts) the layer is exactly detectron2's `ROIAlign`.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from detectron2.layers import ROIAlign
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align

__all__ = [
    "ParallelROIAlign",
    "ParallelBackwardROIAlign",
    "parallel_roi_align",
    "use_parallel_roi_align_",
    "use_parallel_roi_align_backward_",
]

# Below this many sampled values (sampling points x channels) per thread the split forward does
# not pay. Measured on 2 cores, calls of the shapes and R-50 detectors (stock vs split, 5 runs
# each): 2.3-4.2 M values took 6-8 ms stock and 8-10 ms split; 9.4 M, 19 vs 16 ms; 26 M, 65 vs
# 49 ms. The threads share the cores with the caller's OpenMP team, so a split gains far less
# than the thread count.
MIN_WORK_PER_THREAD = 2_500_000

# The torch.profiler region of a split forward (its parts run in other threads).
PROFILER_REGION = "slim_det::parallel_roi_align"

_POOL = {}


def _one_intra_op_thread():
    # Mark this thread's thread count as initialised (else ATen would set it to the global count
    # at its first parallel op), then give it one thread.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool(workers):
    """The process's pool of ``workers`` threads, each running its ATen ops on one thread.

    A worker that ran ops on several threads would start an OpenMP team of its own. With more
    OpenMP threads than cores, libgomp stops spin-waiting between parallel regions and puts its
    threads to sleep, which made *every* op of the model slower (a shapes detector's inference
    1.6x at 128 px, the backbone included), far more than the split ROIAlign saved. Workers
    therefore run on one thread each; `torch.set_num_threads` also sets the count new threads
    start with, which is restored once every worker has started.
    """
    # Per process: a forked child inherits the pool object but none of its threads; it gets its
    # own pool rather than relying on how the executor copes with that.
    key = (os.getpid(), workers)
    if key not in _POOL:
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(workers, thread_name_prefix="roi_align",
                                  initializer=_one_intra_op_thread)
        started = threading.Barrier(workers)  # one task per worker: every worker starts now
        for future in [pool.submit(started.wait) for _ in range(workers)]:
            future.result()
        torch.set_num_threads(threads)
        _POOL[key] = pool
    return _POOL[key]


def _sampling_points(rois, output_size, spatial_scale, sampling_ratio):
    """Per ROI, the sampling points torchvision's kernel visits (approximately: for balance)."""
    pooled_h, pooled_w = output_size
    if sampling_ratio > 0:
        return torch.full((len(rois),), float(sampling_ratio ** 2 * pooled_h * pooled_w))
    size = (rois[:, 3:5] - rois[:, 1:3]).float() * spatial_scale  # width, height
    grid = (size / size.new_tensor([pooled_w, pooled_h])).ceil().clamp(min=1)
    return grid.prod(dim=1) * (pooled_h * pooled_w)


def parallel_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision's CPU ``roi_align``, its ROIs split over the intra-op threads.

    Same arguments and result (bit for bit) as ``torchvision.ops.roi_align`` with a (R, 5)
    ``rois`` tensor; small calls, and calls off the CPU, run torchvision's op directly.
    """
    output_size = _pair(output_size)
    threads = torch.get_num_threads()
    if input.device.type != "cpu" or threads < 2 or len(rois) < 2:
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    points = _sampling_points(rois, output_size, spatial_scale, sampling_ratio)
    cumulative = points.double().cumsum(0)
    total = cumulative[-1].item()
    if not math.isfinite(total):  # boxes with inf / nan: torchvision's op, alone, decides
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    parts = min(threads, len(rois), math.floor(total * input.shape[1] / MIN_WORK_PER_THREAD))
    if parts < 2:
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    # Equal shares of the sampling points; each ROI goes where its points end.
    targets = cumulative.new_tensor([total * k / parts for k in range(1, parts)])
    bounds = [0] + (torch.searchsorted(cumulative, targets) + 1).tolist() + [len(rois)]
    bounds = sorted(set(bounds))
    input = input.contiguous()  # the kernel would copy it once per part otherwise

    def align(lo_hi):
        lo, hi = lo_hi
        return roi_align(input, rois[lo:hi], output_size, spatial_scale, sampling_ratio, aligned)

    ranges = list(zip(bounds[:-1], bounds[1:]))
    # A profiler sees only the calling thread's ops: this region shows the whole call.
    with torch.profiler.record_function(PROFILER_REGION):
        # The calling thread computes the last part instead of waiting idle.
        futures = [_pool(threads - 1).submit(align, r) for r in ranges[:-1]]
        last = align(ranges[-1])
        return torch.cat([f.result() for f in futures] + [last])


class _Parallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.settings = (_pair(output_size), spatial_scale, sampling_ratio, aligned)
        ctx.input_shape = input.shape
        return parallel_roi_align(input, rois, output_size, spatial_scale, sampling_ratio,
                                  aligned)

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


def _tracing():
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


class ParallelROIAlign(ROIAlign):
    """detectron2's `ROIAlign` with the multi-threaded CPU forward and backward described above.

    On other devices, and under tracing, scripting or compilation, it is exactly detectron2's
    `ROIAlign`.
    """

    def forward(self, input, rois):
        if input.device.type != "cpu" or input.is_quantized or _tracing():
            return super().forward(input, rois)
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"rois must have shape (R, 5); got {tuple(rois.shape)}.")
        rois = rois.to(dtype=input.dtype)
        if torch.is_grad_enabled() and input.requires_grad:
            return _Parallel.apply(input, rois, self.output_size, self.spatial_scale,
                                   self.sampling_ratio, self.aligned)
        return parallel_roi_align(input, rois, self.output_size, self.spatial_scale,
                                  self.sampling_ratio, self.aligned)


# The name this layer had when only its backward was parallel.
ParallelBackwardROIAlign = ParallelROIAlign


def use_parallel_roi_align_(model):
    """Replace every detectron2 `ROIAlign` in ``model`` by a `ParallelROIAlign`, in place.

    Nothing else changes: ROIAlign has no parameters or buffers, so state dicts stay the same.

    Returns:
        int: how many were replaced.
    """
    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is ROIAlign:
                setattr(module, name, ParallelROIAlign(
                    child.output_size, child.spatial_scale, child.sampling_ratio, child.aligned
                ))
                replaced += 1
    return replaced


# The name this function had when only the backward was parallel.
use_parallel_roi_align_backward_ = use_parallel_roi_align_
