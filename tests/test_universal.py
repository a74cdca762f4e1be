"""Universally slimmable mode: config, shared norms, the sandwich rule, a short run."""
import json
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import build_model

import slim_det
from slim_det.calibration import calibrate_norms, switchable_norms, widths_without_statistics
from slim_det.config import is_universal
from slim_det.deploy import width_grid
from slim_det.engine import SlimTrainer, train_loop
from slim_det.layers import make_slimmable_
from slim_det.sampling import FixedWidths, SandwichChannels, SandwichWidths, build_width_schedule
from slim_det.width import active_channels
from tests.engine_helpers import read_metrics, shapes_cfg, train
from tests.helpers import images, slim_cfg


def universal_cfg(**slim):
    cfg = slim_cfg("faster")
    cfg.MODEL.SLIM.MODE = "universal"
    cfg.MODEL.SLIM.WIDTH_RANGE = [0.25, 1.0]
    cfg.MODEL.SLIM.CALIBRATE_INIT_IMAGES = 0
    for key, value in slim.items():
        cfg.MODEL.SLIM[key] = value
    return cfg


@pytest.mark.parametrize("key, value, message", [
    ("MODE", "elastic", r"MODEL.SLIM.MODE must be one of \('switchable', 'universal'\); "
                        r"got 'elastic'"),
    ("WIDTH_RANGE", [0.0, 1.0], r"MODEL.SLIM.WIDTH_RANGE must be \[min, max\] with 0 < min < max "
                                r"<= 1; got \[0.0, 1.0\]"),
    ("WIDTH_RANGE", [0.25, 1.5], r"WIDTH_RANGE .*got \[0.25, 1.5\]"),
    ("WIDTH_RANGE", [0.5, 0.5], r"WIDTH_RANGE .*got \[0.5, 0.5\]"),
    ("WIDTH_RANGE", [0.8, 0.3], r"WIDTH_RANGE .*got \[0.8, 0.3\]"),
    ("WIDTH_RANGE", [0.5], r"WIDTH_RANGE .*got \[0.5\]"),
    ("NUM_SAMPLED", 1, r"MODEL.SLIM.NUM_SAMPLED must be an integer >= 2.*got 1"),
    ("WIDTHS", [0.1, 0.5, 1.0], r"MODEL.SLIM.WIDTHS must lie inside MODEL.SLIM.WIDTH_RANGE "
                                r"\[0.25, 1\] in universal mode; got \[0.1, 0.5, 1.0\] \(\[0.1\]"),
    ("TEST_WIDTHS", [0.2], r"MODEL.SLIM.TEST_WIDTHS must lie inside .*got \[0.2\]"),
    ("CALIBRATE_INIT_IMAGES", 100, r"CALIBRATE_INIT_IMAGES must be 0 in universal mode.*got 100"),
])
def test_bad_universal_config_is_named(key, value, message):
    cfg = universal_cfg(**{key: value})
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_bad_calibration_image_counts_are_named():
    cfg = slim_cfg("faster")
    cfg.TEST.CALIBRATION_IMAGES = -1
    with pytest.raises(ValueError, match=r"TEST.CALIBRATION_IMAGES must be an integer >= 0; got -1"
                       ):
        build_model(cfg)
    cfg = slim_cfg("faster")
    cfg.MODEL.SLIM.CALIBRATE_INIT_IMAGES = 1.5
    with pytest.raises(ValueError, match=r"CALIBRATE_INIT_IMAGES must be an integer >= 0; got 1.5"):
        build_model(cfg)


def test_universal_widths_need_not_include_one():
    cfg = universal_cfg(WIDTHS=[0.3, 0.7])
    model = build_model(cfg)
    assert all(norm.universal and len(norm.private) == 0 for norm in switchable_norms(model))


@pytest.mark.parametrize("norm_class", [nn.BatchNorm2d, nn.SyncBatchNorm, NaiveSyncBatchNorm])
def test_universal_norm_is_the_shared_norm_sliced_with_batch_statistics(norm_class):
    torch.manual_seed(0)
    layer = make_slimmable_(nn.Sequential(nn.Conv2d(3, 32, 3), norm_class(32)), widths=())
    bn = layer[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 9)
    for width in (1.0, 0.6, 0.3):
        slim_det.set_width(layer, width)
        c = active_channels(32, width)
        y = F.batch_norm(layer[0](x), None, None, bn.weight[:c], bn.bias[:c], True, 0.0, bn.eps)
        torch.testing.assert_close(layer(x), y)
    layer.eval()
    with pytest.raises(ValueError, match=r"Width 0.3 has no calibrated batch-norm statistics"):
        layer(x)
    calibrate_norms(layer, [x, x], [0.3], num_images=4)  # a "batch" here is any module input
    assert layer(x).shape[1] == active_channels(32, 0.3)


def test_universal_frozen_bn_uses_its_frozen_statistics_sliced_until_calibrated():
    torch.manual_seed(0)
    layer = make_slimmable_(nn.Sequential(nn.Conv2d(3, 32, 3), FrozenBatchNorm2d(32)), widths=())
    bn = layer[1]
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    slim_det.set_width(layer, 0.5)
    c = active_channels(32, 0.5)
    y = F.batch_norm(layer[0](x), bn.running_mean[:c], bn.running_var[:c], bn.weight[:c],
                     bn.bias[:c], False, 0.0, bn.eps)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), y)
    calibrate_norms(layer, [x], [0.5], num_images=2)
    assert not torch.allclose(layer(x), y)  # now the width's own statistics
    torch.testing.assert_close(bn.private["w0_5"].weight, bn.weight[:c])  # affine kept


def test_sandwich_draws_max_min_and_random_widths_largest_first():
    schedule = SandwichWidths((0.25, 1.0), num_sampled=4, seed=3)
    for iteration in range(50):
        drawn = schedule.widths_for(iteration)
        assert [label for label, _ in drawn].count("rand") == 2
        assert drawn[0] == ("max", 1.0) and drawn[-1] == ("min", 0.25)
        widths = [w for _, w in drawn]
        assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4
        assert all(0.25 < w < 1.0 for w in widths[1:-1])
    assert len({tuple(schedule.widths_for(i)) for i in range(50)}) == 50


def test_sandwich_draw_is_a_pure_function_of_seed_and_iteration():
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    a = SandwichWidths((0.3, 1.0), 5, seed=11)
    draws = {i: a.widths_for(i) for i in (0, 7, 1000, 7)}
    # Another process, or a run resumed at iteration 1000, builds its own schedule and asks in
    # another order, with the global generators in another state: the same widths.
    torch.manual_seed(123)
    random.seed(456)
    b = SandwichWidths((0.3, 1.0), 5, seed=11)
    assert {i: b.widths_for(i) for i in (1000, 7, 0)} == draws
    assert SandwichWidths((0.3, 1.0), 5, seed=12).widths_for(7) != draws[7]
    torch.random.set_rng_state(torch_state)
    random.setstate(python_state)
    SandwichWidths((0.3, 1.0), 5, seed=11).widths_for(3)
    assert torch.equal(torch.random.get_rng_state(), torch_state)  # global RNGs untouched
    assert random.getstate() == python_state


def test_sandwich_widths_run_distinct_channel_counts():
    # 64 channels, divisor 8, widths in [0.25, 1]: 7 distinct counts (16, 24, ..., 64).
    schedule = SandwichWidths((0.25, 1.0), num_sampled=6, seed=0, channels=64, divisor=8)
    for iteration in range(30):
        counts = [active_channels(64, w, 8) for _, w in schedule.widths_for(iteration)]
        assert len(set(counts)) == 6, counts


def test_schedule_from_config():
    assert isinstance(build_width_schedule(slim_cfg("faster"), None), FixedWidths)
    cfg = universal_cfg(NUM_SAMPLED=3)
    cfg.SEED = 5
    schedule = build_width_schedule(cfg, build_model(cfg))
    assert isinstance(schedule, SandwichWidths)
    assert (schedule.low, schedule.high, schedule.num_sampled, schedule.seed) == (0.25, 1.0, 3, 5)
    assert schedule.channels == 2048 * 16 // 64  # widest slimming layer of the shrunk R50: res5


def test_short_universal_run_evaluates_widths_never_drawn(tmp_path):
    cfg = shapes_cfg("universal_mask", tmp_path, **{"TEST.CALIBRATION_IMAGES": 8})
    assert cfg.MODEL.SLIM.MODE == "universal"
    trainer = train(cfg)
    records = read_metrics(tmp_path)
    losses = next(r for r in records if "total_loss" in r)
    for label in ("max", "min", "rand"):
        assert f"{label}/loss_cls" in losses and f"{label}/loss_mask" in losses
        assert f"{label}/fast_rcnn/fg_cls_accuracy" in losses
    assert not [k for k in losses if k.startswith("w")]  # no metric named after a drawn width
    final = records[-1]
    for width in ("1", "0.85", "0.6", "0.4", "0.25"):
        assert f"w{width}/bbox/AP" in final and f"w{width}/segm/AP" in final
    # Evaluation calibrated every width; they stay usable until training continues.
    model = trainer.model
    assert widths_without_statistics(model, [1.0, 0.85, 0.6, 0.4, 0.25]) == []
    schedule = trainer._trainer.schedule
    drawn = {w for i in range(cfg.SOLVER.MAX_ITER) for _, w in schedule.widths_for(i)}
    assert not drawn & {0.85, 0.6, 0.4}
    model.eval()
    with torch.no_grad(), slim_det.using_width(model, 0.6):
        assert len(model(images(1, 64))) == 1


@pytest.mark.parametrize("name", [f"slim_{task}_rcnn{scope}_universal" for task in
                                  ("faster", "mask", "keypoint") for scope in ("", "_all")])
def test_coco_universal_configs_validate(name):
    import os

    from detectron2.config import get_cfg

    from slim_det.config import slim_settings
    from tests.helpers import CONFIGS

    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
    scope = "all" if "_all" in name else "backbone"
    assert slim_settings(cfg) == ((), scope, 8)  # universal: no private norms
    assert cfg.MODEL.SLIM.MODE == "universal" and cfg.TEST.CALIBRATION_IMAGES > 0
    assert cfg.MODEL.KEYPOINT_ON == ("keypoint" in name) and cfg.MODEL.MASK_ON == ("mask" in name)


def test_universal_parameter_count_equals_switchable_at_every_width():
    from slim_det.analysis import _used_parameters, active_parameter_count

    switchable = build_model(slim_cfg("faster"))
    universal = build_model(universal_cfg())
    universal.load_state_dict(switchable.state_dict(), strict=False)
    inputs = images(1, 64)
    calibrate_norms(universal, [inputs], [1.0, 0.5], num_images=1)  # eval uses calibrated norms
    for width in (1.0, 0.5):
        with slim_det.using_width(switchable, width), slim_det.using_width(universal, width):
            expected = active_parameter_count(switchable, inputs)
            assert active_parameter_count(universal, inputs) == expected
    # Uncalibrated (training): the shared norm's affine, sliced, is what runs.
    norm = universal.backbone.bottom_up.res3[0].conv1.norm
    norm.drop_calibrated()
    slim_det.set_width(universal, 0.5)
    x = torch.zeros(1, norm.channels_at(0.5), 4, 4)
    assert _used_parameters(norm, (x,)) == 2 * norm.channels_at(0.5) < 2 * norm.num_features


def test_spectrum_of_many_widths_in_one_evaluation(tmp_path):
    # A universal model evaluated at 16 widths in one pass: one row each, and the curve plotted.
    grid = width_grid(0.25, 1.0, 0.05)
    cfg = shapes_cfg("universal_mask", tmp_path, **{"TEST.CALIBRATION_IMAGES": 4,
                                                    "MODEL.SLIM.TEST_WIDTHS": grid})
    torch.manual_seed(0)
    model = build_model(cfg)
    results = SlimTrainer.test(cfg, model)
    assert sorted(float(k[1:]) for k in results) == grid
    with open(tmp_path / "shapes_tiny_val" / "width_table.json") as f:
        rows = json.load(f)["rows"]
    assert [r["width"] for r in rows] == sorted(grid, reverse=True)
    gflops = [r["gflops"] for r in rows]
    assert gflops == sorted(gflops, reverse=True) and gflops[0] > 4 * gflops[-1]
    assert (tmp_path / "shapes_tiny_val" / "ap_vs_gflops.png").stat().st_size > 0


@pytest.mark.parametrize("key, value, message", [
    ("SAMPLING", "layerwise", r"MODEL.SLIM.SAMPLING must be one of \['uniform', 'per_group'\]; "
                              r"got 'layerwise'"),
])
def test_bad_sampling_is_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(universal_cfg(**{key: value}))


def test_per_group_sampling_needs_universal_mode():
    cfg = slim_cfg("faster")
    cfg.MODEL.SLIM.SAMPLING = "per_group"
    with pytest.raises(ValueError, match=r"SAMPLING 'per_group' needs MODEL.SLIM.MODE "
                                         r"\"universal\""):
        build_model(cfg)


def test_per_group_sandwich_draws_non_uniform_configurations_inside_the_range():
    cfg = universal_cfg(SAMPLING="per_group", NUM_SAMPLED=4)
    cfg.SEED = 2
    model = build_model(cfg)
    schedule = build_width_schedule(cfg, model)
    assert isinstance(schedule, SandwichChannels)
    groups = slim_det.channel_groups(model)
    non_uniform = 0
    for iteration in range(20):
        drawn = schedule.widths_for(iteration)
        assert drawn[0] == ("max", 1.0) and drawn[-1] == ("min", 0.25)
        assert [label for label, _ in drawn[1:-1]] == ["rand", "rand"]
        for _, config in drawn[1:-1]:
            assert set(config) == {g.name for g in groups}
            for g in groups:
                assert g.channels_at(0.25) <= config[g.name] <= g.full
                assert config[g.name] in g.allowed
            # A uniform width w gives every group channels_at(w); a per-group draw must not.
            uniform = [{g.name: g.channels_at(w) for g in groups}
                       for w in [i / 64 for i in range(16, 65)]]
            non_uniform += dict(config) not in uniform
    assert non_uniform == 40
    again = build_width_schedule(cfg, model)
    assert [again.widths_for(i) for i in (0, 9)] == [schedule.widths_for(i) for i in (0, 9)]


def test_short_per_group_run_trains_configurations_and_ends_uniform(tmp_path, monkeypatch):
    cfg = shapes_cfg("universal_mask", tmp_path, **{"TEST.CALIBRATION_IMAGES": 8,
                                                    "MODEL.SLIM.SAMPLING": "per_group"})
    applied = []
    real_apply = train_loop.apply_setting
    monkeypatch.setattr(train_loop, "apply_setting",
                        lambda model, setting: applied.append(setting) or real_apply(model, setting))
    trainer = train(cfg)
    configs = [s for s in applied if isinstance(s, dict)]
    assert len(configs) == 2 * cfg.SOLVER.MAX_ITER  # NUM_SAMPLED - 2 per iteration
    assert isinstance(trainer._trainer.schedule, SandwichChannels)
    records = read_metrics(tmp_path)
    losses = next(r for r in records if "total_loss" in r)
    for label in ("max", "min", "rand"):
        assert f"{label}/loss_cls" in losses and f"{label}/loss_mask" in losses
    assert not [k for k in losses if k.startswith(("w", "c"))]  # labels only, no config names
    assert slim_det.get_width(trainer.model) == 1.0  # back to uniform after every step
    final = records[-1]
    for width in ("1", "0.6", "0.25"):
        assert f"w{width}/bbox/AP" in final


def test_a_per_group_supernet_exports_widths_and_builds_configurations(tmp_path):
    """Exporting a width, or building the plain model of a searched configuration, from a
    per-group supernet's config: both describe a fixed architecture, not per-group training."""
    from slim_det.export import export_width
    from slim_det.individual import build_channel_model

    cfg = universal_cfg(SCOPE="all", SAMPLING="per_group")
    cfg.MODEL.RESNETS.DEPTH = 18  # below width 1 an R-18 exports as a fixed-channel model
    cfg.MODEL.SLIM.DIVISOR = 4
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    calibrate_norms(model, [images(2, 64)], [0.5], 2)
    plain_cfg, plain, kind = export_width(model.eval(), cfg, 0.5)
    assert kind == "fixed_channel" and plain_cfg.MODEL.SLIM.SAMPLING == "uniform"
    with torch.no_grad(), slim_det.using_width(model, 0.5):
        expected = model(images(1, 64))
        assert slim_det.export.max_output_difference(plain.eval()(images(1, 64)), expected) < 1e-4
    groups = slim_det.channel_groups(model)
    config = {g.name: random.Random(1).choice(g.allowed) for g in groups}
    plain_config = build_channel_model(cfg, config)
    assert not slim_det.width.is_slimmable(plain_config)
    # Retraining it from the supernet's own config (benchmarks/autoslim.py, README's command).
    path = str(tmp_path / "channels.json")
    slim_det.channels.save_channels(slim_det.channels.ChannelConfig(config), path)
    retrain = cfg.clone()
    retrain.MODEL.SLIM.INDIVIDUAL_CHANNELS = path
    assert not is_universal(retrain)
    slim_det.config.slim_settings(retrain)
    from slim_det.individual import build_individual_model
    from slim_det.layers import SlimConv2d
    retrained = build_individual_model(retrain)
    assert not any(isinstance(m, SlimConv2d) for m in retrained.modules())
