import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import slim_det
from slim_det.width import active_channels, make_divisible
from tests.helpers import build, slim_cfg


def test_make_divisible_rule():
    assert make_divisible(64 * 0.25) == 16
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 would be < 90% of 11.2
    assert make_divisible(96 * 0.35) == 32
    assert make_divisible(3.0, 8) == 8
    assert make_divisible(20, 4) == 20


def test_active_channels_full_width_is_exact_and_bounded():
    for c in (3, 17, 64, 1280):
        assert active_channels(c, 1.0) == c
        assert 1 <= active_channels(c, 0.1) <= c
    # MobileNet v2 expansion: 6 x the rounded base width, not the rounded expanded width.
    assert active_channels(96, 0.35, 8, expansion=6) == 48
    assert active_channels(96, 0.35, 8) == 32


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "half", None])
def test_set_width_rejects_bad_values(bad):
    model = build(slim_cfg("faster"))
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 1\]"):
        slim_det.set_width(model, bad)


def test_set_width_reaches_every_slim_layer_and_context_restores():
    model = build(slim_cfg("mask", scope="all"))
    layers = [m for m in model.modules() if isinstance(m, slim_det.width.SlimModule)]
    # backbone, FPN, RPN head, box head, box predictor and mask head are all slimmable
    names = {n.split(".")[0] for n, m in model.named_modules() if m in layers}
    assert names == {"backbone", "proposal_generator", "roi_heads"}
    slim_det.set_width(model, 0.5)
    assert all(m.width == 0.5 for m in layers)
    assert slim_det.get_width(model) == 0.5
    with slim_det.using_width(model, 0.25):
        assert slim_det.get_width(model) == 0.25
    assert slim_det.get_width(model) == 0.5


def test_get_width_reports_inconsistent_layers():
    model = build(slim_cfg("faster"))
    next(m for m in model.modules() if isinstance(m, slim_det.width.SlimModule)).width = 0.5
    with pytest.raises(ValueError, match="different widths"):
        slim_det.get_width(model)


def test_set_width_on_plain_model_is_an_error():
    with pytest.raises(ValueError, match="no slimmable layer"):
        slim_det.set_width(torch.nn.Linear(2, 2), 0.5)


def test_set_width_through_ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = build(slim_cfg("faster"))
        ddp = DistributedDataParallel(model, device_ids=None)
        slim_det.set_width(ddp, 0.75)
        assert slim_det.get_width(model) == 0.75
        assert slim_det.get_width(ddp) == 0.75
    finally:
        dist.destroy_process_group()
