"""Robust slimmable training: loss reduction, global clipping, divergence warnings, stable costs."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import slim_det
from slim_det.analysis import detector_costs
from slim_det.engine import DivergenceMonitor, SlimTrainer, slim_forward_backward
from slim_det.engine.train_loop import clip_grad_norm
from tests.engine_helpers import shapes_cfg
from tests.helpers import CONFIGS

ROOT = os.path.dirname(CONFIGS)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mean_reduction_is_the_sum_divided_by_the_number_of_widths(tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    model = SlimTrainer.build_model(cfg)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))
    grads = {}
    for reduction in ("sum", "mean"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same proposals and ROI samples for both
        with EventStorage():
            losses = slim_forward_backward(model, data, [1.0, 0.5, 0.25], reduction=reduction)
        grads[reduction] = _grads(model)
        assert set(losses) == {1.0, 0.5, 0.25}
    assert grads["sum"].keys() == grads["mean"].keys()
    for name, grad in grads["sum"].items():
        torch.testing.assert_close(grads["mean"][name] * 3, grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_loss_weights_scale_each_widths_gradient(tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    model = SlimTrainer.build_model(cfg)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))

    def grads(widths, weights=None):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same proposals and ROI samples on every call
        with EventStorage():
            slim_forward_backward(model, data, widths, reduction="sum", weights=weights)
        return _grads(model)

    # Width 1.0 runs first, so it sees the same random state alone and with 0.25 after it: the
    # gradient of the 0.25 pass is the pair's minus width 1.0's.
    wide = grads([1.0])
    both = grads([1.0, 0.25])
    weighted = grads([1.0, 0.25], {1.0: 0.5, 0.25: 3.0})
    assert weighted.keys() == both.keys()
    for name, grad in both.items():
        alone = wide.get(name, torch.zeros_like(grad))
        expected = 0.5 * alone + 3.0 * (grad - alone)
        torch.testing.assert_close(weighted[name], expected, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_loss_weights_key_reaches_the_trainer_and_is_validated(tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    cfg.MODEL.SLIM.WIDTHS = [0.25, 1.0]
    cfg.MODEL.SLIM.LOSS_WEIGHTS = [2.0, 1.0]
    assert SlimTrainer(cfg)._trainer.loss_weights == {0.25: 2.0, 1.0: 1.0}
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.25  # one plain model: nothing to weigh
    assert slim_det.config.width_loss_weights(cfg) is None
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.0
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        cfg.MODEL.SLIM.LOSS_WEIGHTS = bad
        with pytest.raises(ValueError, match=r"MODEL.SLIM.LOSS_WEIGHTS must be empty or one "
                           r"finite number >= 0 per width of MODEL.SLIM.WIDTHS \[0.25, 1.0\]"):
            slim_det.config.slim_settings(cfg)
    cfg.MODEL.SLIM.LOSS_WEIGHTS = [1.0, 1.0]
    cfg.MODEL.SLIM.MODE = "universal"
    cfg.MODEL.SLIM.WIDTH_RANGE = [0.25, 1.0]
    with pytest.raises(ValueError, match="LOSS_WEIGHTS .* universal mode"):
        slim_det.config.slim_settings(cfg)


def test_each_width_logs_the_models_own_metrics_under_its_prefix(tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    model = SlimTrainer.build_model(cfg)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))
    with EventStorage() as storage:
        slim_forward_backward(model, data, [1.0, 0.25])
        names = set(storage.histories())
    for width in ("1", "0.25"):
        assert f"w{width}/fast_rcnn/cls_accuracy" in names
        assert f"w{width}/rpn/num_pos_anchors" in names
    assert "fast_rcnn/cls_accuracy" not in names


def test_bad_loss_reduction_is_refused():
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\); got 'avg'"):
        slim_forward_backward(torch.nn.Linear(1, 1), [], [1.0], reduction="avg")


def test_global_clipping_scales_all_gradients_together():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    total = clip_grad_norm(model, max_norm=1.0)
    assert total == pytest.approx(float(torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in reference]))), rel=1e-5)
    assert total > 1.0
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-4)
    # One factor for every tensor: directions are kept, unlike per-tensor clipping.
    for grad, ref in zip((p.grad for p in model.parameters()), reference):
        torch.testing.assert_close(grad, ref * (1.0 / total), rtol=1e-4, atol=1e-7)
    assert clip_grad_norm(model, max_norm=None) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.SLIM.LOSS_REDUCTION", "avg",
         r"MODEL.SLIM.LOSS_REDUCTION must be one of \('sum', 'mean'\); got 'avg'"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global",
         r"CLIP_TYPE must be one of \('value', 'norm', 'full_model'\); got 'global'"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.0,
         r"CLIP_VALUE must be > 0 with CLIP_TYPE 'full_model'; got 0.0"),
    ],
)
def test_bad_stability_keys_are_refused(key, value, message, tmp_path):
    cfg = shapes_cfg("faster", tmp_path, **{key: value, "SOLVER.CLIP_GRADIENTS.ENABLED": True,
                                             "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model"})
    node, *path = cfg, *key.split(".")
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        SlimTrainer(cfg)


def test_full_model_clipping_is_done_by_the_step_not_by_detectron2(tmp_path):
    cfg = shapes_cfg("faster", tmp_path, **{"SOLVER.CLIP_GRADIENTS.ENABLED": True,
                                             "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
                                             "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.5})
    trainer = SlimTrainer(cfg)
    assert "GradientClip" not in type(trainer.optimizer).__name__
    assert trainer._trainer.max_grad_norm == 0.5
    trainer.train()
    norms = trainer.storage.history("grad_norm").values()
    assert len(norms) == cfg.SOLVER.MAX_ITER and all(v > 0 for v, _ in norms)


class _FakeTrainer:
    def __init__(self):
        self.storage = EventStorage()
        self.iter = 0


def _run_monitor(monitor, steps):
    """Feed ``steps`` (a list of {name: value}) to ``monitor``; return the warnings it logged."""
    trainer = _FakeTrainer()
    monitor.trainer = trainer
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("slim_det.engine.divergence")
    logger.addHandler(handler)
    try:
        for iteration, values in enumerate(steps):
            trainer.iter = trainer.storage.iter = iteration
            for name, value in values.items():
                trainer.storage.put_scalar(name, value)
            monitor.after_step()
    finally:
        logger.removeHandler(handler)
    return messages


def _healthy(i, label):
    return {f"w{label}/loss_cls": 1.4 * 0.98 ** i, f"w{label}/loss_box_reg": 0.5,
            f"w{label}/fast_rcnn/fg_cls_accuracy": min(0.9, 0.02 * i)}


def test_monitor_is_quiet_on_a_healthy_run():
    steps = [{**_healthy(i, "1"), **_healthy(i, "0.25")} for i in range(80)]
    assert _run_monitor(DivergenceMonitor(["1", "0.25"], window=10, check_after=30), steps) == []


def test_monitor_names_the_width_and_iteration_of_a_spike_once():
    steps = [{**_healthy(i, "1"), **_healthy(i, "0.25")} for i in range(60)]
    for i in (40, 41, 42):
        steps[i]["w0.25/loss_cls"] = 25.0
    messages = _run_monitor(DivergenceMonitor(["1", "0.25"], window=10, check_after=1000), steps)
    assert len(messages) == 1, messages
    assert "Loss spike at width 0.25, iteration 40" in messages[0]


def test_monitor_reports_a_classifier_collapsed_after_a_spike():
    # The case of issue 8: loss_cls spikes to 4.9, then sits at ~0.68 (the class prior) while
    # the classifier calls every object background; that is *lower* than the 1.4 it started at.
    loss = [1.4] * 10 + [0.8] * 20 + [4.9] * 2 + [0.68] * 40
    steps = [{**_healthy(i, "1"), "w0.5/loss_cls": value, "w0.5/loss_box_reg": 0.5,
              "w0.5/fast_rcnn/fg_cls_accuracy": 0.0} for i, value in enumerate(loss)]
    messages = _run_monitor(DivergenceMonitor(["1", "0.5"], window=10, check_after=50), steps)
    assert len(messages) == 2, messages
    assert "Loss spike at width 0.5, iteration 30" in messages[0]
    assert "box classifier at width 0.5 has not learned by iteration 50" in messages[1]
    assert "since its loss spiked at iteration 30" in messages[1]


def test_monitor_reports_a_classifier_that_unlearned_foreground():
    accuracy = [min(0.5, 0.02 * i) for i in range(40)] + [0.0] * 30
    steps = [{**_healthy(i, "1"), "w1/fast_rcnn/fg_cls_accuracy": value}
             for i, value in enumerate(accuracy)]
    messages = _run_monitor(DivergenceMonitor(["1"], window=10, check_after=30), steps)
    assert len(messages) == 1 and "it had reached 50.0%" in messages[0], messages


def test_monitor_is_quiet_while_a_healthy_classifier_still_calls_everything_background():
    # Early training: every ROI background for 100+ iterations, the loss slowly falling.
    steps = [{"w0.25/loss_cls": 1.4 if i < 10 else 0.65 - 0.0005 * i, "w0.25/loss_box_reg": 0.5,
              "w0.25/fast_rcnn/fg_cls_accuracy": 0.0} for i in range(150)]
    assert _run_monitor(DivergenceMonitor(["0.25"], window=20, check_after=60), steps) == []


def test_monitor_reports_a_classification_loss_that_never_fell():
    steps = [{"w1/loss_cls": 1.4, "w1/loss_box_reg": 0.5} for _ in range(50)]
    messages = _run_monitor(DivergenceMonitor(["1"], window=10, check_after=30), steps)
    assert len(messages) == 1 and "no lower than" in messages[0], messages


def test_costs_do_not_depend_on_what_the_model_detects(tmp_path):
    cfg = shapes_cfg("mask", tmp_path)
    model = build_model(cfg).eval()
    costs = detector_costs(model, (64, 64), 50, 20)
    with torch.no_grad():  # a different model: it would detect other boxes
        for p in model.roi_heads.box_predictor.parameters():
            p.mul_(-3.0)
    assert detector_costs(model, (64, 64), 50, 20) == costs
    # The mask head's cost is linear in the number of detections it is counted on.
    d0, d20, d40 = (detector_costs(model, (64, 64), 50, d)["gflops"] for d in (0, 20, 40))
    assert d40 - d20 == pytest.approx(d20 - d0) and d20 > d0
    assert costs["backbone_gflops"] < costs["gflops"]
    with slim_det.using_width(model, 0.25):
        narrow = detector_costs(model, (64, 64), 50, 20)
    assert narrow["gflops"] < costs["gflops"] and narrow["params"] < costs["params"]


def _tiny_config_file(tmp_path, task):
    """One YAML file: the shapes leaf config as _BASE_ plus configs/tests/tiny.yaml's keys."""
    with open(os.path.join(CONFIGS, "tests", "tiny.yaml")) as f:
        tiny = yaml.safe_load(f)
    tiny["_BASE_"] = os.path.join(CONFIGS, "shapes", f"slim_{task}_rcnn_shapes.yaml")
    path = tmp_path / f"tiny_{task}.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return str(path)


@pytest.mark.parametrize("eval_only", [False, True])
def test_train_net_prints_the_width_table_to_the_terminal_and_log(eval_only, tmp_path):
    out = tmp_path / "out"
    overrides = ["OUTPUT_DIR", str(out), "DATASETS.TRAIN", "('shapes_tiny_train',)",
                 "DATASETS.TEST", "('shapes_tiny_val',)"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
           _tiny_config_file(tmp_path, "faster")] + ["--eval-only"] * eval_only + overrides
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    for text in (run.stdout + run.stderr, log):
        assert "Per-width results on shapes_tiny_val" in text
        assert "|   width |   GFLOPs |" in text
        assert "heads counted on a fixed 50 proposals and 20 detections" in text
        for width in ("1", "0.75", "0.5", "0.25"):
            assert f"Evaluation results for shapes_tiny_val at width {width}:" in text


def test_global_clipping_with_the_max_norm():
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.tensor([[1.0, -7.0, 2.0], [0.5, 0.0, 3.0]])
    model.bias.grad = torch.tensor([4.0, -1.0])
    assert clip_grad_norm(model, max_norm=3.5, norm_type=float("inf")) == pytest.approx(7.0)
    assert float(model.weight.grad.abs().max()) == pytest.approx(3.5, rel=1e-5)
