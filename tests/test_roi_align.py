"""The multi-threaded ROIAlign backward: torchvision's outputs and gradients, bit for bit."""
import pytest
import torch
from detectron2.layers import ROIAlign
from torchvision.ops import roi_align

from slim_det.engine import SlimTrainer
from slim_det.roi_align import ParallelBackwardROIAlign, use_parallel_roi_align_backward_

from .helpers import slim_cfg


def _rois(num, num_images, extent, generator, sort=True):
    batch = torch.randint(0, num_images, (num,), generator=generator).float()
    if sort:
        batch = batch.sort().values
    corner = torch.rand(num, 2, generator=generator) * extent * 1.2 - 6
    size = torch.rand(num, 2, generator=generator) * extent * 0.6 - 1  # a few empty / inverted
    rois = torch.cat([batch[:, None], corner, corner + size], dim=1)
    rois[0, 3:] = rois[0, 1:3]  # a zero-size box
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("sort", [True, False])
def test_gradients_equal_torchvision_bit_for_bit(aligned, sampling_ratio, sort):
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three channel groups, uneven (7 channels)
    try:
        x = torch.randn(3, 7, 12, 10, generator=generator, requires_grad=True)
        rois = _rois(40, 3, 48, generator, sort=sort)
        grad_out = torch.randn(40, 7, 5, 4, generator=generator)
        layer = ParallelBackwardROIAlign((5, 4), 0.25, sampling_ratio, aligned)
        ours = layer(x, rois)
        theirs = roi_align(x, rois, (5, 4), 0.25, sampling_ratio, aligned)
        assert torch.equal(ours, theirs)
        (grad_ours,) = torch.autograd.grad((ours * grad_out).sum(), x)
        (grad_theirs,) = torch.autograd.grad((theirs * grad_out).sum(), x)
        assert grad_theirs.abs().sum() > 0
        assert torch.equal(grad_ours, grad_theirs)
    finally:
        torch.set_num_threads(threads)


def test_no_grad_int_output_size_and_bad_rois():
    x = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 20.0, 20.0]])
    layer = ParallelBackwardROIAlign((2, 2), 0.5, 0, True)
    assert torch.equal(layer(x, rois), ROIAlign((2, 2), 0.5, 0, True)(x, rois))
    square = ParallelBackwardROIAlign(2, 0.5, 0, True)  # an int size, as ROIAlign accepts
    x_grad = x.clone().requires_grad_()
    square(x_grad, rois).sum().backward()
    x_ref = x.clone().requires_grad_()
    roi_align(x_ref, rois, 2, 0.5, 0, True).sum().backward()
    assert torch.equal(x_grad.grad, x_ref.grad)
    with pytest.raises(ValueError, match=r"rois must have shape \(R, 5\); got \(1, 4\)"):
        layer(x.requires_grad_(), rois[:, 1:])


def test_trainer_models_get_it():
    cfg = slim_cfg("mask", scope="all")
    model = SlimTrainer.build_model(cfg)
    poolers = [m for m in model.modules() if isinstance(m, ROIAlign)]
    assert len(poolers) == 8  # box and mask poolers, 4 levels each
    assert all(type(m) is ParallelBackwardROIAlign for m in poolers)
    assert use_parallel_roi_align_backward_(model) == 0  # nothing left to replace
