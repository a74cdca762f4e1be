"""Batch-norm calibration: exact statistics, nothing else touched, train mode, checkpoints."""
import copy
import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.modules.batchnorm import _BatchNorm

import slim_det
from slim_det import calibration
from slim_det.calibration import (
    build_calibration_loader,
    calibrate_norms,
    switchable_norms,
    widths_without_statistics,
)
from slim_det.engine import SlimTrainer
from slim_det.engine.calibration_hooks import prepare_loaded_norms
from slim_det.layers import SwitchableNorm, private_norm_name
from tests.engine_helpers import shapes_cfg, state_of

WIDTHS = [1.0, 0.6, 0.5]  # 0.6 was never trained: it gets a calibrated private norm


def _model_and_loader(tmp_path, norm="BN", images=4, **opts):
    cfg = shapes_cfg("faster", tmp_path, **{"MODEL.RESNETS.NORM": norm}, **opts)
    torch.manual_seed(0)
    model = SlimTrainer.build_model(cfg)
    with torch.no_grad():  # affines as after training, so normalising with the wrong one shows
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    loader, per_process = build_calibration_loader(cfg, images)
    return cfg, model, list(loader), per_process


def _stats_target(norm, width):
    name = private_norm_name(width)
    return norm.private[name] if name in norm.private else norm


def _reference_statistics(model, batches, widths):
    """Each norm's input mean / unbiased variance at each width, from the plain computation:
    every BN in train mode (batch statistics), inputs caught by forward pre-hooks."""
    ref = copy.deepcopy(model).eval()
    inputs = {}
    for name, norm in ref.named_modules():
        if isinstance(norm, SwitchableNorm):
            norm.calibrated = set()  # keep the calibrated private norms as if trained
            norm.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(
                    (name, slim_det.get_width(ref)), []).append(args[0].detach()))
    for module in ref.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    with torch.no_grad():
        for batch in batches:
            for width in widths:
                slim_det.set_width(ref, width)
                ref(batch)
    stats = {}
    for key, xs in inputs.items():
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1).double()
        stats[key] = (flat.mean(dim=1), flat.var(dim=1, unbiased=True))
    return stats


def test_calibrated_statistics_are_exact_and_nothing_else_changes(tmp_path):
    _, model, batches, images = _model_and_loader(tmp_path)
    before = state_of(model)
    calibrate_norms(model, batches, WIDTHS, images)
    assert not model.training and slim_det.get_width(model) == 1.0
    after = state_of(model)

    expected = _reference_statistics(model, batches, WIDTHS)
    calibrated_keys = set()
    checked = 0
    for name, norm in model.named_modules():
        if not isinstance(norm, SwitchableNorm):
            continue
        for width in WIDTHS:
            target = _stats_target(norm, width)
            mean, var = expected[(name, width)]
            torch.testing.assert_close(target.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(target.running_var.double(), var, rtol=1e-4, atol=1e-5)
            prefix = name + ("." if target is norm else f".private.{private_norm_name(width)}.")
            calibrated_keys |= {prefix + "running_mean", prefix + "running_var"}
            checked += 1
    assert checked > 20
    # Only the new private norms of width 0.6 are new; only calibrated statistics changed.
    assert {k for k in after if k not in before} == {
        k for k in after if ".private.w0_6." in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= calibrated_keys
    assert len(changed) > 20  # and they did change from what training / init left


def test_calibrating_with_norms_left_in_eval_mode_is_caught(tmp_path, monkeypatch):
    _, model, batches, images = _model_and_loader(tmp_path)
    before = state_of(model)
    # The classic bug: norms stay in eval mode, so nothing is recorded and nothing changes.
    monkeypatch.setattr(calibration, "_train_norms", lambda norms: None)
    with pytest.raises(RuntimeError, match="not in train mode"):
        calibrate_norms(model, batches, [1.0, 0.5], images)
    after = state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_bn_statistics_recalibrated_affine_kept(tmp_path):
    _, model, batches, images = _model_and_loader(tmp_path, norm="FrozenBN")
    norm = model.backbone.bottom_up.res3[0].conv1.norm
    affine = [t.clone() for t in (norm.weight, norm.bias, norm.private["w0_5"].weight)]
    stats = norm.private["w0_5"].running_var.clone()
    calibrate_norms(model, batches, [1.0, 0.5], images)
    for old, new in zip(affine, (norm.weight, norm.bias, norm.private["w0_5"].weight)):
        assert torch.equal(old, new)
    assert not torch.allclose(stats, norm.private["w0_5"].running_var)


def test_group_norm_model_needs_no_calibration(tmp_path, caplog):
    _, model, batches, images = _model_and_loader(tmp_path, norm="GN")
    before = state_of(model)
    with caplog.at_level(logging.INFO, logger="slim_det.calibration"):
        calibrate_norms(model, batches, [1.0, 0.5], images)
    assert "no calibration is needed" in caplog.text
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in state_of(model).items())


def test_calibrated_width_survives_width_switches_and_checkpoints(tmp_path):
    cfg, model, batches, images = _model_and_loader(tmp_path)
    calibrate_norms(model, batches, [0.6], images)
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad(), slim_det.using_width(model, 0.6):
        boxes = model(image)[0]["instances"].pred_boxes.tensor
    slim_det.set_width(model, 0.25)
    slim_det.set_width(model, 1.0)
    DetectionCheckpointer(model, str(tmp_path)).save("calibrated")

    fresh = SlimTrainer.build_model(cfg).eval()
    assert widths_without_statistics(fresh, [0.6, 0.5]) == [0.6]
    DetectionCheckpointer(fresh).load(str(tmp_path / "calibrated.pth"))
    assert widths_without_statistics(fresh, [0.6, 0.5]) == []
    with torch.no_grad(), slim_det.using_width(fresh, 0.6):
        torch.testing.assert_close(fresh(image)[0]["instances"].pred_boxes.tensor, boxes)
    # Training changes the weights the statistics describe: calibrated widths are dropped.
    fresh.train()
    with torch.no_grad(), slim_det.using_width(fresh, 1.0):
        fresh.backbone(torch.rand(1, 3, 64, 64))
    assert widths_without_statistics(fresh, [0.6, 0.5]) == [0.6]


def _mismatched_model(tmp_path, **opts):
    cfg, trained, _, _ = _model_and_loader(tmp_path / "a")
    DetectionCheckpointer(trained, str(tmp_path)).save("four_widths")  # [0.25, 0.5, 0.75, 1]
    cfg = shapes_cfg("faster", tmp_path / "b", **{"MODEL.SLIM.WIDTHS": [0.3, 0.5, 1.0]}, **opts)
    model = SlimTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "four_widths.pth"))
    return cfg, model


def test_checkpoint_with_other_widths_is_refused_not_sliced(tmp_path):
    cfg, model = _mismatched_model(tmp_path)
    assert widths_without_statistics(model, [1.0, 0.5, 0.3]) == [0.3]
    model.eval()
    with torch.no_grad(), slim_det.using_width(model, 0.3), pytest.raises(
        ValueError, match=r"checkpoint has norms for widths \[0.25, 0.5, 0.75, 1.0\]"
    ):
        model([{"image": torch.rand(3, 64, 64) * 255}])
    with pytest.raises(ValueError, match=r"Widths \[0.3\] have no batch-norm statistics: the "
                       r"loaded checkpoint has norms for widths \[0.25, 0.5, 0.75, 1.0\], the "
                       r"config \(MODEL.SLIM.WIDTHS\) \[0.3, 0.5, 1.0\]\. Set "
                       r"MODEL.SLIM.CALIBRATE_INIT_IMAGES"):
        prepare_loaded_norms(cfg, model, fresh_start=True)


def test_checkpoint_with_other_widths_is_calibrated_when_configured(tmp_path):
    cfg, model = _mismatched_model(tmp_path, **{"MODEL.SLIM.CALIBRATE_INIT_IMAGES": 4})
    model.train()
    prepare_loaded_norms(cfg, model, fresh_start=True)
    assert model.training  # the trainer's mode is restored
    assert widths_without_statistics(model, [1.0, 0.5, 0.3]) == []


def test_stock_checkpoint_slices_the_full_norm_and_says_so(tmp_path, caplog):
    cfg, model, _, _ = _model_and_loader(tmp_path)
    stock = {k: v for k, v in model.state_dict().items() if ".private." not in k}
    torch.save({"model": stock}, tmp_path / "stock.pth")
    fresh = SlimTrainer.build_model(cfg)
    DetectionCheckpointer(fresh).load(str(tmp_path / "stock.pth"))
    with caplog.at_level(logging.INFO, logger="slim_det.calibration"):
        prepare_loaded_norms(cfg, fresh, fresh_start=True)
    assert "no per-width norms" in caplog.text and "sliced" in caplog.text
    norm = fresh.backbone.bottom_up.res2[0].conv1.norm
    torch.testing.assert_close(norm.private["w0_5"].running_var,
                               model.backbone.bottom_up.res2[0].conv1.norm.running_var[:32])
    assert widths_without_statistics(fresh, [0.25, 0.5, 0.75, 1.0]) == []
    # MODEL.SLIM.CALIBRATE_INIT_IMAGES turns the slices into each width's own statistics.
    sliced = norm.private["w0_5"].running_var.clone()
    cfg.MODEL.SLIM.CALIBRATE_INIT_IMAGES = 4
    prepare_loaded_norms(cfg, fresh, fresh_start=True)
    assert not torch.allclose(norm.private["w0_5"].running_var, sliced)


def test_evaluation_calibrates_untrained_widths_or_refuses(tmp_path):
    cfg = shapes_cfg("faster", tmp_path, **{"MODEL.SLIM.TEST_WIDTHS": [0.6, 1.0],
                                            "TEST.CALIBRATION_IMAGES": 0})
    model = SlimTrainer.build_model(cfg)
    with pytest.raises(ValueError, match=r"Widths \[0.6\] have no batch-norm statistics.*"
                       r"trained for widths.*TEST.CALIBRATION_IMAGES"):
        SlimTrainer.test(cfg, model)
    cfg.TEST.CALIBRATION_IMAGES = 4
    results = SlimTrainer.test(cfg, model)
    assert "bbox" in results["w0.6"] and "bbox" in results["w1"]
    assert model.training  # evaluation during training leaves the trainer's mode alone
    assert len(switchable_norms(model)) > 0


def test_calibrate_tool_saves_a_checkpoint_that_evaluates_at_new_widths(tmp_path):
    import importlib.util

    from tests.helpers import CONFIGS, REPO

    spec = importlib.util.spec_from_file_location("calibrate_tool", f"{REPO}/tools/calibrate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg, model, _, _ = _model_and_loader(tmp_path)
    DetectionCheckpointer(model, str(tmp_path)).save("trained")
    opts = ["MODEL.WEIGHTS", str(tmp_path / "trained.pth"),
            "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATALOADER.NUM_WORKERS", "0",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.SLIM.DIVISOR", "4",
            "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
    out = tmp_path / "calibrated.pth"
    tool.main(["--config-file", f"{CONFIGS}/shapes/slim_faster_rcnn_shapes.yaml", "--widths",
               "0.6", "0.4", *opts[:2], "--output", str(out), "--images", "4", *opts[2:]])
    fresh = SlimTrainer.build_model(cfg).eval()
    DetectionCheckpointer(fresh).load(str(out))
    assert widths_without_statistics(fresh, [1.0, 0.6, 0.5, 0.4]) == []
    with torch.no_grad(), slim_det.using_width(fresh, 0.4):
        assert len(fresh([{"image": torch.rand(3, 64, 64) * 255}])) == 1
