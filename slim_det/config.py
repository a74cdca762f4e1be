"""slim_det's config keys, added to a detectron2 config by `add_slim_config`."""
import logging

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .width import check_width

SCOPES = ("backbone", "all")
LOSS_REDUCTIONS = ("sum", "mean")
# detectron2's per-tensor "value" / "norm", and "full_model": the global norm of all gradients,
# as mmdet (the S-Nets paper's grad_clip max_norm=35) and detectron2's DETR project clip.
CLIP_TYPES = ("value", "norm", "full_model")
SLIM_RPN_HEADS = ("SlimRPNHead",)
SLIM_ROI_HEADS = ("SlimStandardROIHeads",)


def add_slim_config(cfg):
    """Add slim_det's keys (``MODEL.SLIM.*``) to a detectron2 config, in place.

    Args:
        cfg (CfgNode): a config from ``detectron2.config.get_cfg()``.

    Returns:
        CfgNode: ``cfg`` itself.
    """
    cfg.MODEL.SLIM = CN()
    # The widths trained every iteration (S-Nets). Each gets its own private batch norm. The
    # largest must be 1.0: the full-width model is the stock detectron2 model.
    cfg.MODEL.SLIM.WIDTHS = [0.25, 0.5, 0.75, 1.0]
    # What slims. "backbone": only the backbone, as in the S-Nets paper; FPN outputs and heads stay
    # full width (the FPN lateral convs read the slim features, the exact form of zero-padding).
    # "all": the FPN, the RPN head and the ROI box / mask / keypoint heads slim as well (their
    # predictors' outputs stay full); they dominate the detector's cost on real hardware.
    cfg.MODEL.SLIM.SCOPE = "backbone"
    # Active channels at width w are make_divisible(channels * w, DIVISOR).
    cfg.MODEL.SLIM.DIVISOR = 8
    # The widths to evaluate; empty means every width in WIDTHS.
    cfg.MODEL.SLIM.TEST_WIDTHS = []
    # 0 (off) or one width w in (0, 1]: build and train the PLAIN model of width w instead of the
    # slimmable one (a fresh fixed-channel model with that width's channel counts, initialised by
    # detectron2's own rules), as the individually trained baseline the slimmable model is
    # compared with (S-Nets Table 5; benchmarks/fidelity.py). Same data, schedule and seed.
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.0
    # How the widths' losses make the iteration's one gradient. "sum": each width's loss as it is
    # (S-Nets Algorithm 1), so the shared weights take about len(WIDTHS) times the step of a
    # single model at the same BASE_LR. "mean": each loss divided by len(WIDTHS), so BASE_LR
    # means what it means for one model (the private norms then learn len(WIDTHS) times slower).
    cfg.MODEL.SLIM.LOSS_REDUCTION = "mean"

    # Warnings when a width's training goes wrong (slim_det.engine.DivergenceMonitor).
    cfg.MODEL.SLIM.DIVERGENCE = CN()
    # Iterations in the running medians the checks compare against.
    cfg.MODEL.SLIM.DIVERGENCE.WINDOW = 20
    # A width's total loss above this many times its recent median is a spike.
    cfg.MODEL.SLIM.DIVERGENCE.SPIKE_FACTOR = 3.0
    # From this iteration on, a box classifier that has not learned is reported; -1 means
    # 2 x SOLVER.WARMUP_ITERS (at least 2 x WINDOW).
    cfg.MODEL.SLIM.DIVERGENCE.CHECK_AFTER = -1

    # The slimmable MobileNet v1 / v2 backbones (MODEL.BACKBONE.NAME build_slim_mobilenet_v{1,2}_*).
    cfg.MODEL.MOBILENET = CN()
    # Trunk outputs, named like detectron2's ResNet stages so FPN configs carry over: "stem"
    # (stride 2), "res2".."res5" (strides 4, 8, 16, 32).
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Norm of every trunk conv (a detectron2 get_norm name; GN does not fit MobileNet's channel
    # counts). The trunk freezes its first stages with MODEL.BACKBONE.FREEZE_AT, as ResNet does.
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    return cfg


def load_slim_cfg(config_file, opts=()):
    """detectron2's defaults + slim_det's keys + ``config_file`` + ``KEY VALUE`` ``opts``.

    Without CUDA, a ``cuda`` MODEL.DEVICE falls back to ``cpu`` (with a warning), so the configs
    written for GPUs run as they are on a CPU machine. The returned config is not frozen.
    """
    cfg = add_slim_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("slim_det").warning("CUDA is not available: using MODEL.DEVICE=cpu.")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def slim_settings(cfg):
    """Validate ``cfg.MODEL.SLIM`` and return (widths ascending, scope, divisor).

    Raises:
        ValueError: naming the bad key and value when the slim config is invalid.
    """
    if "SLIM" not in cfg.MODEL:
        raise ValueError(
            "cfg.MODEL.SLIM is missing: call slim_det.add_slim_config(cfg) before merging a "
            "slim_det config."
        )
    slim = cfg.MODEL.SLIM
    widths = _check_width_list("MODEL.SLIM.WIDTHS", slim.WIDTHS)
    if not widths:
        raise ValueError("MODEL.SLIM.WIDTHS must list at least one width; got [].")
    if widths[-1] != 1.0:
        raise ValueError(f"The largest of MODEL.SLIM.WIDTHS must be 1.0; got {list(slim.WIDTHS)}.")
    if slim.SCOPE not in SCOPES:
        raise ValueError(f"MODEL.SLIM.SCOPE must be one of {SCOPES}; got {slim.SCOPE!r}.")
    if not isinstance(slim.DIVISOR, int) or slim.DIVISOR < 1:
        raise ValueError(f"MODEL.SLIM.DIVISOR must be a positive integer; got {slim.DIVISOR!r}.")
    _check_width_list("MODEL.SLIM.TEST_WIDTHS", slim.TEST_WIDTHS)
    individual_width(cfg)
    if slim.LOSS_REDUCTION not in LOSS_REDUCTIONS:
        raise ValueError(
            f"MODEL.SLIM.LOSS_REDUCTION must be one of {LOSS_REDUCTIONS}; got "
            f"{slim.LOSS_REDUCTION!r}."
        )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {CLIP_TYPES}; got {clip.CLIP_TYPE!r}."
        )
    if clip.ENABLED and clip.CLIP_TYPE == "full_model" and not clip.CLIP_VALUE > 0:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 with CLIP_TYPE 'full_model'; got "
            f"{clip.CLIP_VALUE!r}."
        )
    if slim.SCOPE == "all":
        if cfg.MODEL.RPN.HEAD_NAME not in SLIM_RPN_HEADS:
            raise ValueError(
                f"MODEL.SLIM.SCOPE 'all' needs MODEL.RPN.HEAD_NAME in {SLIM_RPN_HEADS}; got "
                f"{cfg.MODEL.RPN.HEAD_NAME!r}."
            )
        if cfg.MODEL.ROI_HEADS.NAME not in SLIM_ROI_HEADS:
            raise ValueError(
                f"MODEL.SLIM.SCOPE 'all' needs MODEL.ROI_HEADS.NAME in {SLIM_ROI_HEADS}; got "
                f"{cfg.MODEL.ROI_HEADS.NAME!r}."
            )
    return widths, slim.SCOPE, slim.DIVISOR


def individual_width(cfg):
    """MODEL.SLIM.INDIVIDUAL_WIDTH validated: 0.0 when off, else the individual model's width.

    Raises:
        ValueError: naming the key and the bad value.
    """
    value = cfg.MODEL.SLIM.get("INDIVIDUAL_WIDTH", 0.0)
    error = ValueError(
        f"MODEL.SLIM.INDIVIDUAL_WIDTH must be 0 (off) or a width in (0, 1]; got {value!r}."
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error
    if value == 0:
        return 0.0
    try:
        return check_width(value)
    except ValueError:
        raise error from None


def train_widths(cfg):
    """The widths trained every iteration: MODEL.SLIM.WIDTHS, or the one individual width."""
    widths, _, _ = slim_settings(cfg)
    individual = individual_width(cfg)
    return [individual] if individual else widths


def test_widths(cfg):
    """The widths to evaluate, descending: MODEL.SLIM.TEST_WIDTHS, or all trained widths.

    An individually trained model (MODEL.SLIM.INDIVIDUAL_WIDTH) runs at its one width only.
    """
    widths, _, _ = slim_settings(cfg)
    individual = individual_width(cfg)
    if individual:
        chosen = _check_width_list("MODEL.SLIM.TEST_WIDTHS", cfg.MODEL.SLIM.TEST_WIDTHS)
        if chosen not in ([], [individual]):
            raise ValueError(
                f"MODEL.SLIM.TEST_WIDTHS must be empty or [{individual:g}] for an individually "
                f"trained model (MODEL.SLIM.INDIVIDUAL_WIDTH {individual:g}); got {chosen}."
            )
        return [individual]
    chosen = _check_width_list("MODEL.SLIM.TEST_WIDTHS", cfg.MODEL.SLIM.TEST_WIDTHS) or widths
    return sorted(chosen, reverse=True)


def _check_width_list(key, values):
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{key} must be a list of widths in (0, 1]; got {values!r}.")
    widths = []
    for value in values:
        try:
            widths.append(check_width(value))
        except ValueError:
            raise ValueError(f"{key} must hold widths in (0, 1]; got {list(values)}.") from None
    if len(set(widths)) != len(widths):
        raise ValueError(f"{key} must not repeat a width; got {list(values)}.")
    return sorted(widths)
