"""Runtime width choice: the widest width within a latency budget."""
import itertools

import pytest
import torch
from detectron2.layers import Conv2d

import slim_det
from slim_det.deploy import NoWidthFitsError, WidthSelector, select_width, trained_widths

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
