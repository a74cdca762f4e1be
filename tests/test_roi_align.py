"""The multi-threaded ROIAlign forward and backward: torchvision's outputs and gradients, bit for
bit."""
import pytest
import torch
from detectron2.layers import ROIAlign
from torchvision.ops import roi_align

import slim_det.roi_align as parallel
from slim_det.engine import SlimTrainer
from slim_det.roi_align import (
    ParallelBackwardROIAlign,
    ParallelROIAlign,
    parallel_roi_align,
    use_parallel_roi_align_,
    use_parallel_roi_align_backward_,
)

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


@pytest.fixture
def split_everything(monkeypatch):
    """Three threads, and every call split however little work it has; counts the parts run."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return roi_align(*args, **kwargs)

    monkeypatch.setattr(parallel, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(parallel, "roi_align", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield calls
    torch.set_num_threads(threads)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("sort", [True, False])
def test_gradients_equal_torchvision_bit_for_bit(aligned, sampling_ratio, sort, split_everything):
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
        assert len(split_everything) == 3  # the forward ran in three parts
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_forward_without_grad_equals_torchvision_bit_for_bit(aligned, sampling_ratio,
                                                             split_everything):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 20, 16, generator=generator)
    rois = _rois(61, 2, 70, generator, sort=False)
    layer = ParallelROIAlign((7, 7), 0.25, sampling_ratio, aligned)
    with torch.no_grad():
        ours = layer(x, rois)
    assert torch.equal(ours, roi_align(x, rois, (7, 7), 0.25, sampling_ratio, aligned))
    assert sum(split_everything) == 61 and len(split_everything) == 3  # three parts
    # A non-contiguous feature map (a channel slice, as a slim model never makes but a user might).
    wide = torch.randn(2, 12, 20, 16, generator=generator)[:, 3:]
    assert torch.equal(parallel_roi_align(wide, rois, 5, 0.5, sampling_ratio, aligned),
                       roi_align(wide, rois, 5, 0.5, sampling_ratio, aligned))


def test_forward_parts_follow_the_sampling_points(split_everything):
    # One huge ROI and many tiny ones: the huge one takes a part alone.
    rois = torch.tensor([[0.0, 0.0, 0.0, 200.0, 200.0]] + [[0.0, 1.0, 1.0, 3.0, 3.0]] * 30)
    x = torch.randn(1, 4, 60, 60)
    out = parallel_roi_align(x, rois, (2, 2), 0.25, 0, True)
    assert torch.equal(out, roi_align(x, rois, (2, 2), 0.25, 0, True))
    assert sorted(split_everything) == [1, 30]


def test_small_or_empty_calls_run_the_stock_op():
    x = torch.randn(1, 4, 8, 8)
    for rois in (torch.zeros(0, 5), torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]] * 3)):
        # Too little work to split at the default threshold: one call of torchvision's op.
        assert torch.equal(parallel_roi_align(x, rois, 2, 1.0, 0, True),
                           roi_align(x, rois, 2, 1.0, 0, True))


def test_traced_layer_is_torchvision_op(split_everything):
    layer = ParallelROIAlign((3, 3), 0.5, 0, True)
    x, rois = torch.randn(1, 5, 10, 10), _rois(20, 1, 20, torch.Generator().manual_seed(2))
    traced = torch.jit.trace(layer, (x, rois), check_trace=False)
    assert split_everything == []  # traced as one op, not as threads the tracer cannot see
    assert "torchvision::roi_align" in str(traced.graph)
    assert torch.equal(traced(x, rois), roi_align(x, rois, (3, 3), 0.5, 0, True))


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
    assert all(type(m) is ParallelROIAlign for m in poolers)
    assert ParallelBackwardROIAlign is ParallelROIAlign  # the old names still work
    assert use_parallel_roi_align_backward_(model) == 0  # nothing left to replace
    assert use_parallel_roi_align_(model) == 0


def test_inference_models_get_it_and_detect_the_same(split_everything):
    """detectron2's build_model of a slim config (either scope) has it, and a detector's outputs
    are the stock ROIAlign's, bit for bit."""
    import copy

    from detectron2.modeling import build_model

    from .helpers import calibrate_bn_, images

    for scope in ("backbone", "all"):
        model = build_model(slim_cfg("mask", scope=scope))
        poolers = [m for m in model.modules() if isinstance(m, ROIAlign)]
        assert len(poolers) == 8 and all(type(m) is ParallelROIAlign for m in poolers)
    inputs = images(1, size=96)
    calibrate_bn_(model, inputs)
    stock = copy.deepcopy(model)
    for module in stock.modules():
        for name, child in module.named_children():
            if type(child) is ParallelROIAlign:
                setattr(module, name, ROIAlign(child.output_size, child.spatial_scale,
                                               child.sampling_ratio, child.aligned))
    with torch.no_grad():
        ours, theirs = model(inputs)[0]["instances"], stock(inputs)[0]["instances"]
    assert split_everything, "the parallel forward must have run"
    assert len(theirs) > 0
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = ours.get(field), theirs.get(field)
        a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
        assert torch.equal(a, b), field


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_gets_its_own_threads(split_everything):
    """A child forked after the pool started (none of its threads come along) still splits."""
    import multiprocessing

    x, rois = torch.randn(1, 3, 9, 9), _rois(12, 1, 30, torch.Generator().manual_seed(3))
    expected = roi_align(x, rois, 2, 0.5, 0, True)
    assert torch.equal(parallel_roi_align(x, rois, 2, 0.5, 0, True), expected)  # pool started
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(parallel_roi_align, (x, rois, 2, 0.5, 0, True))
        assert torch.equal(result.get(timeout=60), expected)


def test_workers_run_their_ops_on_one_thread():
    """A worker running ops on several threads would start its own OpenMP team; more OpenMP
    threads than cores make libgomp put threads to sleep between ops and slowed the whole model.
    The caller's thread count, and the count a new thread starts with, stay as they were."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pool = parallel._pool(7)  # a size no other test uses: a new pool, its workers start now
        counts = list(pool.map(lambda _: torch.get_num_threads(), range(20)))
        assert counts == [1] * 20
        assert torch.get_num_threads() == 3
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [3]
    finally:
        torch.set_num_threads(threads)
