"""Runtime width choice: the widest width within a latency budget."""
import itertools

import pytest
import torch
from detectron2.layers import Conv2d

import slim_det
from slim_det.deploy import (
    NoWidthFitsError,
    WidthSelector,
    select_width,
    trained_widths,
    width_grid,
)

TABLE = {0.25: 40.0, 0.5: 75.0, 0.75: 120.0, 1.0: 180.0}


@pytest.mark.parametrize(
    "budget, expected", [(1000, 1.0), (180, 1.0), (179.9, 0.75), (100, 0.5), (40, 0.25)]
)
def test_widest_width_within_budget(budget, expected):
    assert select_width(TABLE, budget) == expected


def test_non_monotonic_timings_still_pick_the_widest_that_fits():
    # Timing noise can make a wider width measure faster; the widest fitting one still wins.
    assert select_width({0.25: 50.0, 0.5: 45.0, 1.0: 300.0}, 60) == 0.5


def test_error_names_budget_and_fastest_width():
    with pytest.raises(NoWidthFitsError, match=r"budget of 30 ms.*width, 0\.25, takes 40\.0 ms"):
        select_width(TABLE, 30)
    with pytest.raises(ValueError, match="measure"):
        select_width({}, 30)


def fake_model():
    return torch.nn.Module()  # the fake timer never runs it


def test_selector_measures_lazily_and_remeasures():
    tables = itertools.cycle([TABLE, {w: ms * 2 for w, ms in TABLE.items()}])
    current = {}

    def timer(width):
        if width == min(TABLE):  # each measure() starts with the narrowest width
            current.update(next(tables))
        return current[width]

    selector = WidthSelector(fake_model(), widths=list(TABLE), timer=timer)
    assert selector.select(130) == 0.75  # measured on first use
    assert selector.measure() == {w: ms * 2 for w, ms in TABLE.items()}  # the device got slower
    assert selector.select(130) == 0.25
    with pytest.raises(NoWidthFitsError, match="budget of 50 ms"):
        selector.select(50)
    selector.measure()
    assert selector.select(130) == 0.75


def test_selector_needs_widths_for_a_plain_model():
    with pytest.raises(ValueError, match="pass widths"):
        WidthSelector(fake_model())


def test_selector_times_a_real_model():
    convs = [Conv2d(3, 32, 3, norm=torch.nn.BatchNorm2d(32)), Conv2d(32, 32, 3)]
    model = slim_det.make_slimmable_(torch.nn.Sequential(*convs), [0.25, 0.5, 0.75, 1.0])
    assert trained_widths(model) == [0.25, 0.5, 0.75, 1.0]
    slim_det.set_width(model, 0.75)
    inputs = torch.rand(1, 3, 32, 32)
    selector = WidthSelector(model, widths=[0.5, 1.0], inputs=inputs, warmup=0, repeats=1)
    latencies = selector.measure()
    assert set(latencies) == {0.5, 1.0} and all(ms > 0 for ms in latencies.values())
    assert selector.select(float("inf")) == 1.0
    assert slim_det.get_width(model) == 0.75  # measuring restores the width


def test_width_grid():
    assert width_grid(0.25, 1.0, 0.25) == [0.25, 0.5, 0.75, 1.0]
    grid = width_grid(0.25)
    assert len(grid) == 16 and grid[0] == 0.25 and grid[-1] == 1.0 and 0.6 in grid
    assert width_grid(0.3, 0.5, 0.15) == [0.3, 0.45, 0.5]  # the upper end is always included
    with pytest.raises(ValueError, match="low <= high and step > 0; got low 0.8, high 0.5"):
        width_grid(0.8, 0.5)


def universal_convs():
    convs = [Conv2d(3, 32, 3, norm=torch.nn.BatchNorm2d(32)), Conv2d(32, 32, 3)]
    return slim_det.make_slimmable_(torch.nn.Sequential(*convs), [])  # no widths: universal


def test_selector_on_a_universal_model_measures_its_calibrated_widths():
    model = universal_convs()
    with pytest.raises(ValueError, match="statistics at none.*calibrated first"):
        WidthSelector(model)
    batches = [torch.rand(2, 3, 32, 32) for _ in range(2)]
    grid = width_grid(0.25, 1.0, 0.25)
    with torch.no_grad():  # calibrate_norms takes detectron2 batches; these convs take tensors
        for norm in slim_det.calibration.switchable_norms(model):
            norm.start_calibration(grid)
            norm.train()
        for batch in batches:
            for width in grid:
                slim_det.set_width(model, width)
                model(batch)
        for norm in slim_det.calibration.switchable_norms(model):
            norm.finish_calibration()
    model.eval()
    selector = WidthSelector(model, inputs=batches[0], warmup=0, repeats=1)
    assert selector.widths == grid
    assert set(selector.measure()) == set(grid)
    assert selector.select(float("inf")) == 1.0
    with pytest.raises(ValueError, match=r"Widths \[0.6\] have no batch-norm statistics"):
        WidthSelector(model, widths=[0.5, 0.6])
