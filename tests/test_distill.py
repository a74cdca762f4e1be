"""Inplace distillation: which widths get which terms, on which proposals, and the loss terms."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage

from slim_det.distill import (
    box_distill_loss,
    class_distill_loss,
    install_inplace_distillation,
    rpn_distill_loss,
)
from slim_det.engine import SlimTrainer, slim_forward_backward
from tests.engine_helpers import read_metrics, shapes_cfg, train

TERMS = {"distill_rpn", "distill_cls", "distill_box"}


def _distill_cfg(tmp_path, **opts):
    return shapes_cfg("faster", tmp_path, **{"MODEL.SLIM.DISTILL.ENABLED": True}, **opts)


def test_students_get_distillation_terms_on_the_teachers_proposals(tmp_path):
    cfg = _distill_cfg(tmp_path, **{"MODEL.SLIM.DISTILL.BOX_WEIGHT": 0.0})
    model = SlimTrainer.build_model(cfg)
    distillation = install_inplace_distillation(cfg, model)
    pooled = []
    model.roi_heads.box_pooler.register_forward_pre_hook(
        lambda m, args: pooled.append([b.tensor.clone() for b in args[1]]))
    sampled = []
    original = distillation._sample
    distillation._sample = lambda *a: sampled.append(1) or original(*a)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))
    with EventStorage():
        losses = slim_forward_backward(model, data, [1.0, 0.5, 0.25])
    assert not TERMS & set(losses[1.0])  # the teacher learns from ground truth only
    for width in (0.5, 0.25):
        assert {"distill_rpn", "distill_cls"} <= set(losses[width])
        assert "distill_box" not in losses[width]  # weight 0
        assert all(torch.isfinite(losses[width][k]) for k in ("distill_rpn", "distill_cls"))
    assert len(sampled) == 1  # only the teacher sampled proposals ...
    for boxes in pooled[1:]:  # ... and every student pooled exactly those
        for a, b in zip(boxes, pooled[0]):
            assert torch.equal(a, b)
    # Evaluation and the teacher's own width are untouched; removing restores sampling.
    distillation.remove()
    assert "label_and_sample_proposals" not in vars(model.roi_heads)


def test_students_ground_truth_losses_follow_gt_weight(tmp_path):
    cfg = _distill_cfg(tmp_path)
    model = SlimTrainer.build_model(cfg)
    distillation = install_inplace_distillation(cfg, model)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))

    def losses_at(gt_weight):
        distillation.gt_weight = gt_weight
        torch.manual_seed(0)  # the same proposal and ROI sampling every time
        with EventStorage():
            return slim_forward_backward(model, data, [1.0, 0.5])

    full, half, none = losses_at(1.0), losses_at(0.5), losses_at(0.0)
    ground_truth = set(full[0.5]) - TERMS
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls"} <= ground_truth
    for name in ground_truth:
        torch.testing.assert_close(half[0.5][name], 0.5 * full[0.5][name])
    assert set(none[0.5]) == TERMS  # US-Nets: the teacher is the students' only signal
    for name in TERMS:
        torch.testing.assert_close(half[0.5][name], full[0.5][name])
        torch.testing.assert_close(none[0.5][name], full[0.5][name])
    for losses in (half, none):  # the teacher always learns from ground truth, unscaled
        assert losses[1.0].keys() == full[1.0].keys()
        for name in full[1.0]:
            torch.testing.assert_close(losses[1.0][name], full[1.0][name])


def test_distillation_starts_at_start_iter_and_ramps_up(tmp_path):
    cfg = _distill_cfg(tmp_path, **{"MODEL.SLIM.DISTILL.START_ITER": 2,
                                    "MODEL.SLIM.DISTILL.RAMP_ITERS": 2,
                                    "MODEL.SLIM.DISTILL.GT_WEIGHT": 0.5})
    model = SlimTrainer.build_model(cfg)
    distillation = install_inplace_distillation(cfg, model)
    assert [distillation.schedule(i) for i in range(5)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    data = next(iter(SlimTrainer.build_train_loader(cfg)))

    def losses_at(iteration):
        torch.manual_seed(0)  # the same proposal and ROI sampling every time
        with EventStorage(start_iter=iteration):
            return slim_forward_backward(model, data, [1.0, 0.5])

    before, ramp, full = losses_at(1), losses_at(2), losses_at(3)
    assert not TERMS & set(before[0.5])
    ground_truth = set(full[0.5]) - TERMS
    assert TERMS <= set(ramp[0.5]) and TERMS <= set(full[0.5])
    for name in TERMS:  # halfway up the ramp: half the weight
        torch.testing.assert_close(ramp[0.5][name], 0.5 * full[0.5][name])
    for name in ground_truth:  # ground-truth weight 1 -> 0.5: 0.75 halfway
        torch.testing.assert_close(ramp[0.5][name], 1.5 * full[0.5][name])
    distillation.remove()  # before its start, distillation changes nothing at all
    without = losses_at(1)
    for width in (1.0, 0.5):
        assert before[width].keys() == without[width].keys()
        for name in before[width]:
            assert torch.equal(before[width][name], without[width][name]), (width, name)


def test_distilled_training_logs_the_terms_per_width(tmp_path):
    cfg = _distill_cfg(tmp_path, **{"TEST.EVAL_PERIOD": 0, "DATASETS.TEST": ()})
    train(cfg)
    losses = next(r for r in read_metrics(tmp_path) if "total_loss" in r)
    for width in ("0.75", "0.5", "0.25"):
        assert {f"w{width}/{t}" for t in TERMS} <= set(losses)
    assert not any(k.startswith("w1/distill") for k in losses)


def test_loss_terms():
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    s = [torch.randn_like(x) for x in t]
    flat = lambda xs: torch.cat([x.flatten() for x in xs])  # noqa: E731
    p = flat(t).sigmoid()
    expected = -(p * F.logsigmoid(flat(s)) + (1 - p) * F.logsigmoid(-flat(s))).mean()
    torch.testing.assert_close(rpn_distill_loss(s, t), expected)

    scores_t, scores_s = torch.randn(5, 4), torch.randn(5, 4)
    assert class_distill_loss(scores_t, scores_t, 2.0).abs() < 1e-6
    pt, ps = F.softmax(scores_t / 2, 1), F.softmax(scores_s / 2, 1)
    expected = (pt * (pt.log() - ps.log())).sum(1).mean() * 4
    torch.testing.assert_close(class_distill_loss(scores_s, scores_t, 2.0), expected)

    gt = torch.tensor([0, 2, 3, 1, 3])  # 3 classes; 3 is background
    deltas_t, deltas_s = torch.randn(5, 12), torch.randn(5, 12)
    fg = [(0, 0), (1, 2), (3, 1)]
    expected = sum((deltas_s[r, 4 * c:4 * c + 4] - deltas_t[r, 4 * c:4 * c + 4]).abs().sum()
                   for r, c in fg) / 5
    torch.testing.assert_close(box_distill_loss(deltas_s, deltas_t, gt, 3), expected)
    agnostic = box_distill_loss(deltas_s[:, :4], deltas_t[:, :4], gt, 3)
    torch.testing.assert_close(agnostic, (deltas_s[[0, 1, 3], :4] - deltas_t[[0, 1, 3], :4])
                               .abs().sum() / 5)


@pytest.mark.parametrize("key, value, message", [
    ("CLS_WEIGHT", -1.0, r"MODEL.SLIM.DISTILL.CLS_WEIGHT must be a number >= 0; got -1.0"),
    ("TEMPERATURE", 0.0, r"MODEL.SLIM.DISTILL.TEMPERATURE must be a number > 0; got 0.0"),
    ("ENABLED", "yes", r"MODEL.SLIM.DISTILL.ENABLED must be True or False; got 'yes'"),
    ("GT_WEIGHT", -0.5, r"MODEL.SLIM.DISTILL.GT_WEIGHT must be a number >= 0; got -0.5"),
    ("START_ITER", -1, r"MODEL.SLIM.DISTILL.START_ITER must be an integer >= 0; got -1"),
    ("RAMP_ITERS", 2.5, r"MODEL.SLIM.DISTILL.RAMP_ITERS must be an integer >= 0; got 2.5"),
])
def test_bad_distill_config_is_named(key, value, message, tmp_path):
    cfg = _distill_cfg(tmp_path)
    cfg.MODEL.SLIM.DISTILL[key] = value
    with pytest.raises(ValueError, match=message):
        SlimTrainer.build_model(cfg)


@pytest.mark.parametrize("task, got", [("cascade_mask", "'GeneralizedRCNN' and 'SlimCascadeROIHeads'"),
                                       ("retinanet", "'SlimRetinaNet'"),
                                       ("panoptic_fpn", "'PanopticFPN'")])
def test_distillation_refuses_architectures_it_does_not_hook(task, got, tmp_path):
    """Only an R-CNN's RPN and single box predictor are distilled: elsewhere the terms would be
    silently missing (a cascade's stage predictors are never called as one module)."""
    cfg = shapes_cfg(task, tmp_path, **{"MODEL.SLIM.DISTILL.ENABLED": True})
    with pytest.raises(ValueError, match=r"MODEL.SLIM.DISTILL.ENABLED True distils an R-CNN.*got "
                       + got + r".*Set MODEL.SLIM.DISTILL.ENABLED False"):
        SlimTrainer.build_model(cfg)


def test_distillation_only_needs_a_term(tmp_path):
    cfg = _distill_cfg(tmp_path, **{"MODEL.SLIM.DISTILL.GT_WEIGHT": 0.0,
                                    "MODEL.SLIM.DISTILL.RPN_WEIGHT": 0.0,
                                    "MODEL.SLIM.DISTILL.CLS_WEIGHT": 0.0,
                                    "MODEL.SLIM.DISTILL.BOX_WEIGHT": 0.0})
    with pytest.raises(ValueError, match=r"GT_WEIGHT 0 with every term weight 0 .* nothing to "
                       r"learn"):
        SlimTrainer.build_model(cfg)


def test_loss_term_gradients_follow_the_documented_formulas():
    torch.manual_seed(1)
    # distill_rpn = mean over all N anchors of BCE(s, sigmoid(t)): d/ds = (sigmoid(s) - p) / N.
    t = [torch.randn(2, 3, 4, 4)]
    s = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    rpn_distill_loss(s, t).backward()
    torch.testing.assert_close(s[0].grad, (s[0].detach().sigmoid() - t[0].sigmoid()) / t[0].numel())

    # distill_cls = T^2 * mean over R proposals of KL(p_t || softmax(s / T)):
    # d/ds = T * (softmax(s / T) - p_t) / R.
    temperature, scores_t = 3.0, torch.randn(6, 5)
    scores_s = torch.randn(6, 5, requires_grad=True)
    class_distill_loss(scores_s, scores_t, temperature).backward()
    expected = temperature * (F.softmax(scores_s.detach() / temperature, 1)
                              - F.softmax(scores_t / temperature, 1)) / 6
    torch.testing.assert_close(scores_s.grad, expected)

    # distill_box = sum of |s - t| over the ground-truth class's 4 deltas of foreground
    # proposals, divided by all R sampled proposals (as detectron2's loss_box_reg):
    # d/ds = sign(s - t) / R there, 0 elsewhere (background rows, other classes' columns).
    gt = torch.tensor([0, 2, 3, 1, 3])
    deltas_t = torch.randn(5, 12)
    deltas_s = torch.randn(5, 12, requires_grad=True)
    box_distill_loss(deltas_s, deltas_t, gt, 3).backward()
    expected = torch.zeros(5, 12)
    for row, cls in [(0, 0), (1, 2), (3, 1)]:
        cols = slice(4 * cls, 4 * cls + 4)
        expected[row, cols] = torch.sign(deltas_s.detach()[row, cols] - deltas_t[row, cols]) / 5
    torch.testing.assert_close(deltas_s.grad, expected)


def test_the_teacher_is_the_same_bit_for_bit_with_distillation_on_or_off(tmp_path):
    cfg = _distill_cfg(tmp_path)
    model = SlimTrainer.build_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = next(iter(SlimTrainer.build_train_loader(cfg)))
    widths = [1.0, 0.75, 0.5, 0.25]

    def one_iteration():
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        seen = []  # the teacher's forward: RPN outputs and box predictions at width 1
        hooks = [model.proposal_generator.rpn_head.register_forward_hook(
                     lambda m, a, out: seen.append([x.detach().clone() for x in out[0] + out[1]])),
                 model.roi_heads.box_predictor.register_forward_hook(
                     lambda m, a, out: seen.append([x.detach().clone() for x in out]))]
        torch.manual_seed(0)
        with EventStorage():
            losses = slim_forward_backward(model, data, widths)
        for hook in hooks:
            hook.remove()
        return losses, seen[:2]  # the first two calls are the teacher's (widest first)

    plain_losses, plain_teacher = one_iteration()
    distillation = install_inplace_distillation(cfg, model)
    distilled_losses, distilled_teacher = one_iteration()
    distillation.remove()
    assert set(distilled_losses[1.0]) == set(plain_losses[1.0])  # no term for the teacher
    for name, value in plain_losses[1.0].items():
        assert torch.equal(distilled_losses[1.0][name], value), name
    for plain, distilled in zip(plain_teacher, distilled_teacher):
        for a, b in zip(plain, distilled):
            assert torch.equal(a, b)
    assert TERMS <= set(distilled_losses[0.5])  # the students did distil


def test_diagnosis_benchmark_reports_every_term_at_every_width(tmp_path):
    import importlib.util
    import os

    from tests.helpers import REPO

    cfg = shapes_cfg("faster", tmp_path)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    spec = importlib.util.spec_from_file_location(
        "distill_diagnosis", os.path.join(REPO, "benchmarks", "distill_diagnosis.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--config-file", str(config_file), "--iters", "2", "--every", "1",
                         "--widths", "1.0,0.5", "OUTPUT_DIR", str(tmp_path / "out")])
    assert [p["iter"] for p in result["probes"]] == [0, 1]
    for probe in result["probes"]:
        teacher, student = probe["widths"]["1"], probe["widths"]["0.5"]
        assert not TERMS & set(teacher) and TERMS <= set(student)
        assert teacher["ground_truth_total"]["cos_teacher_gt"] == pytest.approx(1.0)
        for term in TERMS:
            assert student[term]["grad_norm"] > 0
            assert -1.0 <= student[term]["cos_teacher_gt"] <= 1.0
