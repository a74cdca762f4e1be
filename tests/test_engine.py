"""Training all widths, evaluating every width, resume and failure modes."""
import json
import os

import pytest
import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import slim_det
from slim_det.engine import SlimTrainer, slim_forward_backward
from tests.engine_helpers import assert_same_state, read_metrics, shapes_cfg, state_of, train

WIDTHS = ["1", "0.75", "0.5", "0.25"]


@pytest.mark.parametrize("task, tasks", [("faster", ["bbox"]), ("mask", ["bbox", "segm"]),
                                         ("keypoint", ["bbox", "keypoints"])])
def test_train_few_iterations_and_evaluate_every_width(task, tasks, tmp_path):
    cfg = shapes_cfg(task, tmp_path)
    train(cfg)
    records = read_metrics(tmp_path)
    losses = records[-2] if "total_loss" in records[-2] else records[0]
    for width in WIDTHS:
        assert f"w{width}/loss_cls" in losses and f"w{width}/loss_rpn_cls" in losses
    final = records[-1]
    for width in WIDTHS:
        for t in tasks:
            assert f"w{width}/{t}/AP" in final
        assert final[f"w{width}/cost/gflops"] > 0
    gflops = [final[f"w{w}/cost/gflops"] for w in WIDTHS]
    assert gflops == sorted(gflops, reverse=True)  # scope "all": narrower is cheaper
    report = os.path.join(tmp_path, cfg.DATASETS.TEST[0])
    for name in ("width_table.md", "width_table.json", "ap_vs_gflops.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    rows = json.load(open(os.path.join(report, "width_table.json")))["rows"]
    assert [r["width"] for r in rows] == [1.0, 0.75, 0.5, 0.25]


def test_each_width_gets_a_backward_on_the_same_batch(tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    model = SlimTrainer.build_model(cfg)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((slim_det.get_width(m), args[0])))
    with EventStorage():
        losses = slim_forward_backward(model, data, [0.5, 1.0, 0.25])
    assert [w for w, _ in seen] == [1.0, 0.5, 0.25]
    assert all(batch is data for _, batch in seen)
    assert list(losses) == [1.0, 0.5, 0.25]
    private = model.backbone.bottom_up.res2[0].conv1.norm.private
    assert private["w0_5"].weight.grad is not None and private["w0_25"].weight.grad is not None
    assert private["w0_75"].weight.grad is None  # not among the widths trained here
    assert slim_det.get_width(model) == 1.0


@pytest.mark.parametrize("where", ["features", "loss"])
def test_non_finite_loss_names_width_and_iteration(where, tmp_path):
    cfg = shapes_cfg("faster", tmp_path)
    model = SlimTrainer.build_model(cfg)
    data = next(iter(SlimTrainer.build_train_loader(cfg)))

    def poison_features(module, args, output):
        if slim_det.get_width(model) == 0.5:
            return output * float("nan")

    def poison_loss(module, args, output):
        if slim_det.get_width(model) == 0.5:
            results, losses = output
            return results, dict(losses, loss_cls=losses["loss_cls"] * float("inf"))

    if where == "features":  # detectron2's RPN notices first
        model.backbone.bottom_up.stem.register_forward_hook(poison_features)
        message = r"Training diverged at width 0.5, iteration=12"
    else:
        model.roi_heads.register_forward_hook(poison_loss)
        message = r"Loss became infinite or NaN at width 0.5, iteration=12"
    with EventStorage(), pytest.raises(FloatingPointError, match=message):
        slim_forward_backward(model, data, [1.0, 0.5], iteration=12)


@pytest.mark.parametrize("mode", ["switchable", "universal"])
def test_kill_and_resume_equals_uninterrupted(mode, tmp_path):
    opts = {"SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 3, "TEST.EVAL_PERIOD": 0,
            "SOLVER.STEPS": (4,), "DATASETS.TEST": (), "MODEL.SLIM.MODE": mode}
    full = train(shapes_cfg("faster", tmp_path / "full", **opts))

    class Killed(Exception):
        pass

    cfg = shapes_cfg("faster", tmp_path / "resumed", **opts)
    seed_all_rng(cfg.SEED)
    trainer = SlimTrainer(cfg)
    trainer.resume_or_load(resume=False)
    original_step = trainer._trainer.run_step

    def run_step_then_die():
        if trainer.iter == 4:  # model_0000002.pth (after 3 iterations) is on disk
            raise Killed()
        original_step()

    trainer._trainer.run_step = run_step_then_die
    with pytest.raises(Killed):
        trainer.train()
    assert os.path.exists(tmp_path / "resumed" / "model_0000002.pth")
    del trainer

    resumed = SlimTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    assert_same_state(state_of(full.model), state_of(resumed.model))
    assert not torch.equal(  # and training did change the weights
        state_of(full.model)["roi_heads.box_predictor.cls_score.weight"],
        SlimTrainer.build_model(cfg).state_dict()["roi_heads.box_predictor.cls_score.weight"],
    )


@pytest.mark.parametrize("version, widths", [(1, ["1", "0.75", "0.5", "0.25"]),
                                             (2, ["1", "0.75", "0.5", "0.35"])])
def test_mobilenet_trains_and_evaluates_every_width(version, widths, tmp_path):
    cfg = shapes_cfg(f"mobilenet_v{version}_mask", tmp_path)
    train(cfg)
    final = read_metrics(tmp_path)[-1]
    for width in widths:
        assert f"w{width}/bbox/AP" in final and f"w{width}/segm/AP" in final
    assert os.path.exists(tmp_path / cfg.DATASETS.TEST[0] / "width_table.md")


def test_a_cost_that_cannot_be_counted_never_loses_the_evaluation(tmp_path, monkeypatch):
    """A model whose heads the cost counter does not know (e.g. cascade ROI heads) still gets
    its per-width table: the cost cells are empty and the row says why."""
    import slim_det.engine.trainer as trainer_module

    def no_costs(*args, **kwargs):
        raise NotImplementedError("Module [ModuleList] is missing the required 'forward'")

    monkeypatch.setattr(trainer_module, "detector_costs", no_costs)
    cfg = shapes_cfg("mask", output_dir=tmp_path)
    model = SlimTrainer.build_model(cfg)
    results = SlimTrainer.test(cfg, model)
    assert "bbox" in results["w1"]
    with open(tmp_path / cfg.DATASETS.TEST[0] / "width_table.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == len(cfg.MODEL.SLIM.WIDTHS)
    assert all(r["gflops"] is None and "NotImplementedError" in r["note"] for r in rows)
