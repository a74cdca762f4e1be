"""The optimizer named by SOLVER.OPTIMIZER, built on detectron2's parameter groups."""
import torch
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .config import optimizer_name

__all__ = ["build_optimizer"]


def build_optimizer(cfg, model):
    """detectron2's SGD for ``SOLVER.OPTIMIZER "SGD"``; AdamW for ``"ADAMW"``.

    AdamW gets the same parameter groups as detectron2's SGD (WEIGHT_DECAY_NORM, BIAS_LR_FACTOR,
    WEIGHT_DECAY_BIAS), ``SOLVER.BASE_LR`` and ``SOLVER.WEIGHT_DECAY`` (decoupled, so typical
    values are far larger than SGD's, e.g. 0.05), and detectron2's per-tensor gradient clipping
    when configured.

    Raises:
        ValueError: for an optimizer name other than those in `slim_det.config.OPTIMIZERS`
            (raised by `slim_det.config.optimizer_name`).
    """
    if optimizer_name(cfg) == "SGD":
        return build_sgd_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    adamw = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return maybe_add_gradient_clipping(cfg, adamw)
