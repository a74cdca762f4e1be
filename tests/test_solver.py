"""SOLVER.OPTIMIZER: detectron2's SGD by default, AdamW with the same parameter groups."""
import pytest
import torch

from slim_det.config import slim_settings
from slim_det.engine import SlimTrainer

from .helpers import build, slim_cfg


def _groups(optimizer):
    return sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)


def test_sgd_is_detectron2s_and_adamw_keeps_its_groups():
    cfg = slim_cfg("mask", scope="all")
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 0.01, 0.05, 0.0
    model = build(cfg)
    sgd = SlimTrainer.build_optimizer(cfg, model)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == cfg.SOLVER.MOMENTUM
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    adamw = SlimTrainer.build_optimizer(cfg, model)
    assert type(adamw) is torch.optim.AdamW
    assert _groups(adamw) == _groups(sgd)
    # the norms (switchable BN: every width's own) are not decayed, the convs are
    norm_ids = {id(p) for n, p in model.named_parameters() if ".norm." in n or "bn" in n}
    assert norm_ids
    for group in adamw.param_groups:
        if any(id(p) in norm_ids for p in group["params"]):
            assert group["weight_decay"] == 0.0
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.0, 0.05}


def test_adamw_step_changes_the_weights():
    cfg = slim_cfg("faster", scope="all")
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR = "ADAMW", 1e-3
    model = build(cfg)
    optimizer = SlimTrainer.build_optimizer(cfg, model)
    weight = model.roi_heads.box_predictor.cls_score.weight
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    # Adam's first step moves every weight by about lr (the gradient's sign), plus decoupled decay
    assert torch.allclose(before - weight.detach(), torch.full_like(before, 1e-3), atol=2e-5)


def test_unknown_optimizer_is_refused():
    cfg = slim_cfg("mask")
    cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match=r"SOLVER.OPTIMIZER must be one of \('SGD', 'ADAMW'\); "
                                         r"got 'Adam'"):
        slim_settings(cfg)
