"""slim_det's config keys, added to a detectron2 config by `add_slim_config`."""
import logging
import math
import os

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .inputs import merge_config_file, merge_config_opts
from .width import check_width

SCOPES = ("backbone", "all")
MODES = ("switchable", "universal")
SAMPLINGS = ("uniform", "per_group")
LOSS_REDUCTIONS = ("sum", "mean")
# detectron2's per-tensor "value" / "norm", and "full_model": the global norm of all gradients,
# as mmdet (the S-Nets paper's grad_clip max_norm=35) and detectron2's DETR project clip.
CLIP_TYPES = ("value", "norm", "full_model")
OPTIMIZERS = ("SGD", "ADAMW")
SLIM_RPN_HEADS = ("SlimRPNHead",)
SLIM_ROI_HEADS = ("SlimStandardROIHeads", "SlimCascadeROIHeads")
SLIM_SEM_SEG_HEADS = ("SlimSemSegFPNHead",)
# Scope "all": per meta-architecture, the keys naming its heads and the slim names each accepts.
# A meta-architecture missing here has heads that cannot slim (RetinaNet's head is built inside
# the meta-architecture, so its slim version is the meta-architecture SlimRetinaNet).
SCOPE_ALL_HEADS = {
    "GeneralizedRCNN": {"MODEL.RPN.HEAD_NAME": SLIM_RPN_HEADS,
                        "MODEL.ROI_HEADS.NAME": SLIM_ROI_HEADS},
    "PanopticFPN": {"MODEL.RPN.HEAD_NAME": SLIM_RPN_HEADS,
                    "MODEL.ROI_HEADS.NAME": SLIM_ROI_HEADS,
                    "MODEL.SEM_SEG_HEAD.NAME": SLIM_SEM_SEG_HEADS},
    "SemanticSegmentor": {"MODEL.SEM_SEG_HEAD.NAME": SLIM_SEM_SEG_HEADS},
    "SlimRetinaNet": {},
}
# The slim twin of a stock name, for the error that refuses the stock one under scope "all".
SLIM_TWINS = {
    "RetinaNet": "SlimRetinaNet",
    "StandardRPNHead": "SlimRPNHead",
    "StandardROIHeads": "SlimStandardROIHeads",
    "CascadeROIHeads": "SlimCascadeROIHeads",
    "SemSegFPNHead": "SlimSemSegFPNHead",
}


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
    # Scope "all" with an FPN backbone: the FPN (so the features every head reads) never runs
    # narrower than this width; at width w its outputs have the channels of max(w, FPN_MIN_WIDTH).
    # 0 means the FPN slims with the width like everything else. A narrow FPN is what limits the
    # narrowest detector most (docs/experiments/narrowest_width.md). Not in the papers.
    cfg.MODEL.SLIM.FPN_MIN_WIDTH = 0.0
    # Active channels at width w are make_divisible(channels * w, DIVISOR).
    cfg.MODEL.SLIM.DIVISOR = 8
    # The widths to evaluate; empty means every width in WIDTHS.
    cfg.MODEL.SLIM.TEST_WIDTHS = []
    # Fewer RPN proposals at inference for narrow widths (MODEL.PROPOSAL_GENERATOR.NAME "SlimRPN"):
    # [max_width, count] pairs, e.g. [[0.5, 50], [0.25, 25]]: at a width up to max_width keep
    # count proposals per image (the smallest max_width covering the width applies); wider widths
    # keep MODEL.RPN.POST_NMS_TOPK_TEST. Inexact: it trades AP for speed
    # (docs/experiments/proposals_per_width.md). Empty: every width keeps POST_NMS_TOPK_TEST.
    cfg.MODEL.SLIM.RPN_POST_NMS_TOPK_TEST = []
    # 0 (off) or one width w in (0, 1]: build and train the PLAIN model of width w instead of the
    # slimmable one (a fresh fixed-channel model with that width's channel counts, initialised by
    # detectron2's own rules), as the individually trained baseline the slimmable model is
    # compared with (S-Nets Table 5; benchmarks/fidelity.py). Same data, schedule and seed.
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = 0.0
    # "" (off) or the path of a channel configuration (JSON, as tools/autoslim.py writes): build
    # and train the PLAIN model with those per-group channel counts instead of the slimmable one,
    # as INDIVIDUAL_WIDTH does for a uniform width (its one result row is labelled width 1). Used
    # to retrain a searched architecture; MODEL.WEIGHTS may be the supernet (tensors sliced).
    cfg.MODEL.SLIM.INDIVIDUAL_CHANNELS = ""
    # How the widths' losses make the iteration's one gradient. "sum": each width's loss as it is
    # (S-Nets Algorithm 1), so the shared weights take about len(WIDTHS) times the step of a
    # single model at the same BASE_LR. "mean": each loss divided by len(WIDTHS), so BASE_LR
    # means what it means for one model (the private norms then learn len(WIDTHS) times slower).
    cfg.MODEL.SLIM.LOSS_REDUCTION = "mean"
    # Switchable mode: one weight per width of WIDTHS, in the same order, multiplying that width's
    # loss before LOSS_REDUCTION (e.g. to give a lagging narrow width a larger share of the shared
    # weights' gradient). Empty means every weight 1, as in S-Nets Algorithm 1. Not in the paper.
    cfg.MODEL.SLIM.LOSS_WEIGHTS = []

    # Warnings when a width's training goes wrong (slim_det.engine.DivergenceMonitor).
    cfg.MODEL.SLIM.DIVERGENCE = CN()
    # Iterations in the running medians the checks compare against.
    cfg.MODEL.SLIM.DIVERGENCE.WINDOW = 20
    # A width's total loss above this many times its recent median is a spike.
    cfg.MODEL.SLIM.DIVERGENCE.SPIKE_FACTOR = 3.0
    # From this iteration on, a box classifier that has not learned is reported; -1 means
    # 2 x SOLVER.WARMUP_ITERS (at least 2 x WINDOW).
    cfg.MODEL.SLIM.DIVERGENCE.CHECK_AFTER = -1

    # "switchable" (S-Nets): every width of WIDTHS trained every iteration, each with a private
    # batch norm. "universal" (US-Nets): any width in WIDTH_RANGE; each iteration trains the max,
    # the min and NUM_SAMPLED - 2 random widths (sandwich rule); one shared batch norm sliced at
    # every width, trained with batch statistics, so evaluation calibrates per-width statistics.
    # In universal mode WIDTHS are only the widths evaluated by default (any, inside the range).
    cfg.MODEL.SLIM.MODE = "switchable"
    # Universal mode: [min, max] of the trainable widths.
    cfg.MODEL.SLIM.WIDTH_RANGE = [0.25, 1.0]
    # Universal mode: widths trained per iteration (max, min and NUM_SAMPLED - 2 random), >= 2.
    cfg.MODEL.SLIM.NUM_SAMPLED = 4
    # Universal mode: what the NUM_SAMPLED - 2 random members of the sandwich are. "uniform": one
    # width for every layer. "per_group": a channel configuration whose channel groups
    # (slim_det.channel_groups) each draw their own width in WIDTH_RANGE, so the network also
    # trains the non-uniform shapes a channel search (tools/autoslim.py) scores. Max and min stay
    # uniform widths either way.
    cfg.MODEL.SLIM.SAMPLING = "uniform"
    # Training images (test-time transforms) to calibrate every width's batch-norm statistics
    # with, right after MODEL.WEIGHTS is loaded and before training: e.g. ImageNet statistics
    # sliced to each width (FrozenBN) become that width's own. 0 = off. Switchable mode only
    # (universal-mode statistics are calibrated at evaluation).
    cfg.MODEL.SLIM.CALIBRATE_INIT_IMAGES = 0
    # Inplace distillation (slim_det/distill.py): the widest width trains on ground truth; each
    # narrower width also matches its detached predictions of the same iteration. Each *_WEIGHT
    # scales one term (0 leaves it out).
    cfg.MODEL.SLIM.DISTILL = CN()
    cfg.MODEL.SLIM.DISTILL.ENABLED = False
    # Binary cross-entropy against the teacher's RPN objectness on every anchor.
    cfg.MODEL.SLIM.DISTILL.RPN_WEIGHT = 1.0
    # KL divergence from the teacher's ROI class distribution (on the teacher's proposals).
    cfg.MODEL.SLIM.DISTILL.CLS_WEIGHT = 1.0
    # Smooth L1 to the teacher's ROI box deltas (ground-truth class, foreground proposals).
    cfg.MODEL.SLIM.DISTILL.BOX_WEIGHT = 1.0
    # Softmax temperature of the class term (the loss is scaled by its square).
    cfg.MODEL.SLIM.DISTILL.TEMPERATURE = 1.0
    # Weight of a student's own ground-truth losses: 1 learns from ground truth and the teacher
    # (slim_det's default), 0 from the teacher only (US-Nets' inplace distillation).
    cfg.MODEL.SLIM.DISTILL.GT_WEIGHT = 1.0
    # The iteration distillation starts at: before it the students train on ground truth alone
    # (their own proposals), so that the teacher has learned something first. 0 = from the start.
    cfg.MODEL.SLIM.DISTILL.START_ITER = 0
    # Iterations from START_ITER over which the terms' weights rise linearly from 0 to theirs
    # (and a student's ground-truth weight moves from 1 to GT_WEIGHT). 0 = at once.
    cfg.MODEL.SLIM.DISTILL.RAMP_ITERS = 0
    # Training images (test-time transforms) to calibrate batch-norm statistics with before
    # evaluating a width that has none (every width in universal mode, untrained widths in
    # switchable mode). 0 = such widths are refused with an error.
    cfg.TEST.CALIBRATION_IMAGES = 1000
    # Evaluation (--eval-only), tools/export_width.py, tools/calibrate.py and tools/demo.py refuse
    # MODEL.WEIGHTS when it leaves a model tensor unloaded (missing, or of another shape), as
    # their numbers would come from random weights (slim_det/weights.py). True: load what fits,
    # warn and go on. Training always loads what fits (fine-tuning from other weights).
    cfg.MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS = False
    # "SGD" (detectron2's: SOLVER.MOMENTUM, NESTEROV) or "ADAMW" (decoupled SOLVER.WEIGHT_DECAY,
    # default betas), with detectron2's parameter groups (WEIGHT_DECAY_NORM, BIAS_LR_FACTOR, ...)
    # either way. The from-scratch shapes configs use ADAMW: in 200 steps it learned far faster.
    cfg.SOLVER.OPTIMIZER = "SGD"

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

    Raises:
        slim_det.inputs.InputError: naming the file or override that cannot be merged (missing
            file, YAML / JSON that does not parse, unknown key, wrong type).
    """
    cfg = add_slim_config(get_cfg())
    merge_config_file(cfg, config_file, "--config-file")
    merge_config_opts(cfg, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("slim_det").warning("CUDA is not available: using MODEL.DEVICE=cpu.")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def slim_settings(cfg):
    """Validate ``cfg.MODEL.SLIM`` and return (norm widths ascending, scope, divisor).

    The norm widths are the widths that get a private batch norm: MODEL.SLIM.WIDTHS in switchable
    mode; none in universal mode, where one shared norm serves every width.

    Raises:
        ValueError: naming the bad key and value when the slim config is invalid.
    """
    if "SLIM" not in cfg.MODEL:
        raise ValueError(
            "cfg.MODEL.SLIM is missing: call slim_det.add_slim_config(cfg) before merging a "
            "slim_det config."
        )
    slim = cfg.MODEL.SLIM
    widths = configured_widths(cfg)
    if slim.SCOPE not in SCOPES:
        raise ValueError(f"MODEL.SLIM.SCOPE must be one of {SCOPES}; got {slim.SCOPE!r}.")
    fpn_min_width(cfg)
    if not isinstance(slim.DIVISOR, int) or slim.DIVISOR < 1:
        raise ValueError(f"MODEL.SLIM.DIVISOR must be a positive integer; got {slim.DIVISOR!r}.")
    _check_width_list("MODEL.SLIM.TEST_WIDTHS", slim.TEST_WIDTHS)
    rpn_post_nms_topk_test(cfg)
    individual_width(cfg)
    _check_count("MODEL.SLIM.CALIBRATE_INIT_IMAGES", slim.CALIBRATE_INIT_IMAGES)
    _check_count("TEST.CALIBRATION_IMAGES", cfg.TEST.get("CALIBRATION_IMAGES", 0))
    _check_distill(slim.get("DISTILL"))
    if slim.get("DISTILL") is not None and slim.DISTILL.ENABLED:
        _check_distill_architecture(cfg)
    if slim.LOSS_REDUCTION not in LOSS_REDUCTIONS:
        raise ValueError(
            f"MODEL.SLIM.LOSS_REDUCTION must be one of {LOSS_REDUCTIONS}; got "
            f"{slim.LOSS_REDUCTION!r}."
        )
    width_loss_weights(cfg)
    optimizer_name(cfg)
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
        _check_scope_all_heads(cfg)
    return (() if is_universal(cfg) else widths), slim.SCOPE, slim.DIVISOR


def rpn_post_nms_topk_test(cfg):
    """MODEL.SLIM.RPN_POST_NMS_TOPK_TEST validated: ``(max_width, count)`` pairs, ascending.

    Raises:
        ValueError: naming the key and the bad value (not [width, count] pairs, a width outside
            (0, 1], a count below 1, a repeated width), or the proposal generator when it is not
            "SlimRPN" (the stock RPN would ignore the key).
    """
    key = "MODEL.SLIM.RPN_POST_NMS_TOPK_TEST"
    value = cfg.MODEL.SLIM.get("RPN_POST_NMS_TOPK_TEST", [])
    allowed = "a list of [max_width, count] pairs, e.g. [[0.5, 50], [0.25, 25]]"
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} must be {allowed}; got {value!r}.")
    pairs = []
    for pair in value:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if ok:
            width, count = pair
            ok = isinstance(count, int) and not isinstance(count, bool) and count >= 1
            try:
                width = check_width(width)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"{key} must be {allowed} (width in (0, 1], count >= 1); got "
                             f"{pair!r} in {list(value)}.")
        pairs.append((width, count))
    widths = [w for w, _ in pairs]
    if len(set(widths)) != len(widths):
        raise ValueError(f"{key} must not repeat a width; got {list(value)}.")
    generator = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if pairs and generator != "SlimRPN":
        raise ValueError(f"{key} needs MODEL.PROPOSAL_GENERATOR.NAME 'SlimRPN' (it reads the "
                         f"width); got {generator!r}.")
    return tuple(sorted(pairs))


def rpn_post_nms_topk_at(pairs, width, default):
    """Proposals per image kept at ``width`` under ``pairs`` (`rpn_post_nms_topk_test`): the
    count of the smallest ``max_width`` covering the width, else ``default``."""
    for max_width, count in pairs:
        if width <= max_width:
            return count
    return default


def _check_scope_all_heads(cfg):
    """Scope "all": refuse a meta-architecture or head that would stay full width, naming the key
    and what to set instead."""
    meta = cfg.MODEL.META_ARCHITECTURE
    backbone_only = ("MODEL.SLIM.SCOPE 'backbone' (the backbone slims, its FPN and the heads stay "
                     "full width)")
    if meta not in SCOPE_ALL_HEADS:
        twin = SLIM_TWINS.get(meta)
        advice = (f"whose head does not slim: set MODEL.META_ARCHITECTURE {twin!r} (the same "
                  f"model, its head slimmable), or {backbone_only}" if twin else
                  f"whose heads have no slim version: set {backbone_only}")
        raise ValueError(
            f"MODEL.SLIM.SCOPE 'all' slims the heads of {sorted(SCOPE_ALL_HEADS)}; "
            f"MODEL.META_ARCHITECTURE is {meta!r}, {advice}."
        )
    for key, names in SCOPE_ALL_HEADS[meta].items():
        name = _select(cfg, key)
        if name in names:
            continue
        twin = SLIM_TWINS.get(name)
        advice = (f"set {key} {twin!r}, or {backbone_only}" if twin else
                  f"{name!r} has no slim version: set {backbone_only}")
        raise ValueError(f"MODEL.SLIM.SCOPE 'all' needs {key} in {names}; got {name!r}: {advice}.")
    norm = cfg.MODEL.RETINANET.NORM if meta == "SlimRetinaNet" else ""
    if norm in ("BN", "SyncBN"):
        # detectron2 turns these into a CycleBatchNormList: per-level norms, one shared affine.
        raise ValueError(
            f"MODEL.RETINANET.NORM {norm!r} gives RetinaNet's head per-level batch norms sharing "
            "one affine, which cannot slim. With MODEL.SLIM.SCOPE 'all' set MODEL.RETINANET.NORM "
            f"to '', 'GN', 'FrozenBN', 'nnSyncBN' or 'naiveSyncBN', or set {backbone_only}."
        )


def _select(cfg, key):
    """The value of a dotted config key ("MODEL.ROI_HEADS.NAME")."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def fpn_min_width(cfg):
    """MODEL.SLIM.FPN_MIN_WIDTH validated, as a float (0.0 when the key is absent).

    With scope "backbone" the FPN is always full width, so any floor holds and changes nothing.

    Raises:
        ValueError: naming the value when it is not a number in [0, 1].
    """
    slim = cfg.MODEL.SLIM
    value = slim.get("FPN_MIN_WIDTH", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            "MODEL.SLIM.FPN_MIN_WIDTH must be a number in [0, 1] (0: the FPN slims with the "
            f"width); got {value!r}."
        )
    return float(value)


def width_loss_weights(cfg):
    """MODEL.SLIM.LOSS_WEIGHTS validated, as {width: weight}; None when empty (all weights 1) and
    for an individually trained model (MODEL.SLIM.INDIVIDUAL_WIDTH).

    Raises:
        ValueError: naming the value when it is not one number >= 0 per width of MODEL.SLIM.WIDTHS
            (at least one > 0), or when it is set in universal mode, whose widths are drawn.
    """
    weights = list(cfg.MODEL.SLIM.get("LOSS_WEIGHTS", []))
    if not weights:
        return None
    if is_universal(cfg):
        raise ValueError(
            "MODEL.SLIM.LOSS_WEIGHTS weighs the widths of MODEL.SLIM.WIDTHS, which universal mode "
            f"does not train (it draws widths every iteration); set it to []. Got {weights}."
        )
    widths = list(cfg.MODEL.SLIM.WIDTHS)
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    if (len(weights) != len(widths) or not numbers or min(weights) < 0 or max(weights) <= 0
            or not all(math.isfinite(w) for w in weights)):
        raise ValueError(
            "MODEL.SLIM.LOSS_WEIGHTS must be empty or one finite number >= 0 per width of "
            f"MODEL.SLIM.WIDTHS {widths} (same order), at least one > 0; got {weights}."
        )
    if individual_width(cfg):
        return None  # one plain model trains one width: there is nothing to weigh against
    return {float(width): float(weight) for width, weight in zip(widths, weights)}


def is_universal(cfg):
    """Whether MODEL.SLIM.MODE is "universal" (validated)."""
    mode = cfg.MODEL.SLIM.get("MODE", "switchable")
    if mode not in MODES:
        raise ValueError(f"MODEL.SLIM.MODE must be one of {MODES}; got {mode!r}.")
    if cfg.MODEL.SLIM.get("INDIVIDUAL_CHANNELS", ""):
        return False  # the plain model of a channel configuration trains as one fixed width
    return mode == "universal"


def width_range(cfg):
    """MODEL.SLIM.WIDTH_RANGE as (min, max), validated."""
    value = cfg.MODEL.SLIM.WIDTH_RANGE
    message = f"MODEL.SLIM.WIDTH_RANGE must be [min, max] with 0 < min < max <= 1; got {value!r}."
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(message)
    try:
        low, high = check_width(value[0]), check_width(value[1])
    except ValueError:
        raise ValueError(message) from None
    if low >= high:
        raise ValueError(message)
    return low, high


def check_runnable_width(cfg, width):
    """``width`` validated as one the configured model can run: any width in (0, 1], and inside
    MODEL.SLIM.WIDTH_RANGE in universal mode (the widths it trained). Returns it as a float."""
    width = check_width(width)
    if is_universal(cfg):
        low, high = width_range(cfg)
        if not low <= width <= high:
            raise ValueError(f"Width {width:g} is outside MODEL.SLIM.WIDTH_RANGE [{low:g}, "
                             f"{high:g}], the widths this universally slimmable model trained.")
    return width


def configured_widths(cfg):
    """MODEL.SLIM.WIDTHS validated for the mode, ascending.

    Switchable mode: the trained widths, largest 1.0. Universal mode: the widths evaluated by
    default, each inside MODEL.SLIM.WIDTH_RANGE (the range, NUM_SAMPLED and
    CALIBRATE_INIT_IMAGES are validated too).
    """
    slim = cfg.MODEL.SLIM
    widths = _check_width_list("MODEL.SLIM.WIDTHS", slim.WIDTHS)
    if not widths:
        raise ValueError("MODEL.SLIM.WIDTHS must list at least one width; got [].")
    if not is_universal(cfg):
        if widths[-1] != 1.0:
            raise ValueError(
                f"The largest of MODEL.SLIM.WIDTHS must be 1.0; got {list(slim.WIDTHS)}."
            )
        if slim.SAMPLING != "uniform" and slim.get("MODE", "switchable") != "universal":
            # (A universal supernet's config retraining one configuration, INDIVIDUAL_CHANNELS,
            # trains a fixed model and ignores SAMPLING.)
            raise ValueError(
                f"MODEL.SLIM.SAMPLING {slim.SAMPLING!r} needs MODEL.SLIM.MODE \"universal\" (a "
                "switchable model trains its fixed WIDTHS); set MODE universal or SAMPLING "
                "uniform.")
        return widths
    low, high = width_range(cfg)
    for key in ("WIDTHS", "TEST_WIDTHS"):
        outside = [w for w in _check_width_list(f"MODEL.SLIM.{key}", slim[key])
                   if not low <= w <= high]
        if outside:
            raise ValueError(
                f"MODEL.SLIM.{key} must lie inside MODEL.SLIM.WIDTH_RANGE [{low:g}, {high:g}] in "
                f"universal mode; got {list(slim[key])} ({outside} outside)."
            )
    if not isinstance(slim.NUM_SAMPLED, int) or slim.NUM_SAMPLED < 2:
        raise ValueError(
            "MODEL.SLIM.NUM_SAMPLED must be an integer >= 2 (the max and min widths, plus "
            f"random ones); got {slim.NUM_SAMPLED!r}."
        )
    if slim.SAMPLING not in SAMPLINGS:
        raise ValueError(f"MODEL.SLIM.SAMPLING must be one of {list(SAMPLINGS)}; got "
                         f"{slim.SAMPLING!r}.")
    if slim.CALIBRATE_INIT_IMAGES:
        raise ValueError(
            "MODEL.SLIM.CALIBRATE_INIT_IMAGES must be 0 in universal mode (its norms train with "
            "batch statistics; statistics are calibrated at evaluation); got "
            f"{slim.CALIBRATE_INIT_IMAGES!r}."
        )
    return widths


def optimizer_name(cfg):
    """SOLVER.OPTIMIZER validated ("SGD" when the key is absent, e.g. an older saved config).

    Raises:
        ValueError: naming the key and the bad value.
    """
    name = cfg.SOLVER.get("OPTIMIZER", "SGD")
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}; got {name!r}.")
    return name


def scaled_lr_steps(cfg, iters):
    """SOLVER.STEPS moved to the same fractions of a schedule of ``iters`` iterations.

    Steps that land on 0 or at/after the end are dropped (they would never change the lr).
    """
    steps = sorted({round(s * iters / cfg.SOLVER.MAX_ITER) for s in cfg.SOLVER.STEPS} - {0})
    return tuple(s for s in steps if s < iters)


def individual_width(cfg):
    """MODEL.SLIM.INDIVIDUAL_WIDTH validated: 0.0 when off, else the individual model's width.

    Raises:
        ValueError: naming the key and the bad value.
    """
    value = cfg.MODEL.SLIM.get("INDIVIDUAL_WIDTH", 0.0)
    if individual_channels(cfg):
        if value not in (0, 0.0):
            raise ValueError(
                "Set one of MODEL.SLIM.INDIVIDUAL_WIDTH and MODEL.SLIM.INDIVIDUAL_CHANNELS; got "
                f"{value!r} and {cfg.MODEL.SLIM.INDIVIDUAL_CHANNELS!r}."
            )
        return 1.0  # the channel configuration's plain model runs as its own "width 1"
    error = ValueError(
        f"MODEL.SLIM.INDIVIDUAL_WIDTH must be 0 (off) or a width in (0, 1]; got {value!r}."
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error
    if value == 0:
        return 0.0
    if is_universal(cfg):
        raise ValueError(
            f"MODEL.SLIM.INDIVIDUAL_WIDTH {value!r} trains one fixed width; it needs "
            f"MODEL.SLIM.MODE 'switchable', got {cfg.MODEL.SLIM.MODE!r}."
        )
    try:
        return check_width(value)
    except ValueError:
        raise error from None


def individual_channels(cfg):
    """MODEL.SLIM.INDIVIDUAL_CHANNELS: "" when off, else the channel configuration file's path.

    Raises:
        ValueError: if the value is not a string or the file does not exist.
    """
    value = cfg.MODEL.SLIM.get("INDIVIDUAL_CHANNELS", "")
    if not isinstance(value, str):
        raise ValueError("MODEL.SLIM.INDIVIDUAL_CHANNELS must be a path to a channel "
                         f"configuration JSON file (or \"\" for off); got {value!r}.")
    if value and not os.path.isfile(value):
        raise ValueError(f"MODEL.SLIM.INDIVIDUAL_CHANNELS {value!r} is not a file; give the path "
                         "of a channel configuration (e.g. tools/autoslim.py's gflops_*.json).")
    return value


def train_widths(cfg):
    """The fixed widths trained every iteration (switchable mode): MODEL.SLIM.WIDTHS, or the one
    width of an individually trained model."""
    slim_settings(cfg)
    individual = individual_width(cfg)
    return [individual] if individual else configured_widths(cfg)


def test_widths(cfg):
    """The widths to evaluate, descending: MODEL.SLIM.TEST_WIDTHS, or MODEL.SLIM.WIDTHS.

    An individually trained model (MODEL.SLIM.INDIVIDUAL_WIDTH) runs at its one width only.
    """
    slim_settings(cfg)
    individual = individual_width(cfg)
    if individual:
        chosen = _check_width_list("MODEL.SLIM.TEST_WIDTHS", cfg.MODEL.SLIM.TEST_WIDTHS)
        if chosen not in ([], [individual]):
            raise ValueError(
                f"MODEL.SLIM.TEST_WIDTHS must be empty or [{individual:g}] for an individually "
                f"trained model (MODEL.SLIM.INDIVIDUAL_WIDTH {individual:g}); got {chosen}."
            )
        return [individual]
    widths = configured_widths(cfg)
    chosen = _check_width_list("MODEL.SLIM.TEST_WIDTHS", cfg.MODEL.SLIM.TEST_WIDTHS) or widths
    return sorted(chosen, reverse=True)


def _check_distill(distill):
    if distill is None:
        return
    if not isinstance(distill.ENABLED, bool):
        raise ValueError(f"MODEL.SLIM.DISTILL.ENABLED must be True or False; got "
                         f"{distill.ENABLED!r}.")
    for name in ("RPN_WEIGHT", "CLS_WEIGHT", "BOX_WEIGHT", "GT_WEIGHT"):
        value = distill[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"MODEL.SLIM.DISTILL.{name} must be a number >= 0; got {value!r}.")
    terms = {name: distill[name] for name in ("RPN_WEIGHT", "CLS_WEIGHT", "BOX_WEIGHT")}
    if distill.ENABLED and distill.GT_WEIGHT == 0 and not any(terms.values()):
        raise ValueError(f"MODEL.SLIM.DISTILL.GT_WEIGHT 0 with every term weight 0 ({terms}) "
                         "leaves the narrower widths nothing to learn; give a term a weight > 0.")
    value = distill.TEMPERATURE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"MODEL.SLIM.DISTILL.TEMPERATURE must be a number > 0; got {value!r}.")
    for name in ("START_ITER", "RAMP_ITERS"):
        value = distill.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"MODEL.SLIM.DISTILL.{name} must be an integer >= 0; got {value!r}.")


# What inplace distillation hooks (slim_det/distill.py): an R-CNN's RPN head and its one box
# predictor. A cascade's per-stage predictors, RetinaNet and the segmentation heads are not
# distilled, so those are refused rather than silently trained without the terms.
DISTILL_META_ARCHITECTURES = ("GeneralizedRCNN",)
DISTILL_ROI_HEADS = ("StandardROIHeads", "SlimStandardROIHeads")


def _check_distill_architecture(cfg):
    meta, heads = cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS.NAME
    if meta not in DISTILL_META_ARCHITECTURES or heads not in DISTILL_ROI_HEADS:
        raise ValueError(
            f"MODEL.SLIM.DISTILL.ENABLED True distils an R-CNN's RPN and box predictor: it needs "
            f"MODEL.META_ARCHITECTURE in {DISTILL_META_ARCHITECTURES} and MODEL.ROI_HEADS.NAME in "
            f"{DISTILL_ROI_HEADS}; got {meta!r} and {heads!r}. Set MODEL.SLIM.DISTILL.ENABLED "
            "False for this architecture."
        )


def _check_count(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0; got {value!r}.")


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
