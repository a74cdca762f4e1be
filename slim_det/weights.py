"""Loading MODEL.WEIGHTS: what a checkpoint filled, and refusing one that does not fit.

detectron2 loads whatever fits and skips the rest with a warning, which is right when *training*
starts from ImageNet or another task's weights. When a model is *evaluated*, exported, calibrated
or run on an image, a tensor the checkpoint did not fill keeps its random initial value and the
numbers mean nothing. `load_weights` therefore refuses such a checkpoint for those uses with one
`IncompatibleCheckpointError` naming the checkpoint, how many tensors did not fit, the first few
keys with both shapes and the likely cause (another depth, other widths, another number of
classes, weights without the heads). ``MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS: True`` turns the
refusal into a warning. Training keeps detectron2's tolerance; `SlimTrainer` logs
`LoadSummary.line`.

The accounting builds on fvcore's ``Checkpointer._load_model``, whose ``_IncompatibleKeys`` lists
the missing, unexpected and shape-mismatched keys; `SlimCheckpointer` records it. Tensors the slim
model derives itself do not count as missing: the private norms of widths a checkpoint has no
norm for (`slim_det.layers.SwitchableNorm`: from a stock checkpoint they are the full norm,
sliced; from a checkpoint with other widths' norms they get the sliced affine and their
statistics are calibrated before they are used, or the width is refused).
"""
import logging
import os
import re
import statistics
from dataclasses import dataclass

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

from .inputs import InputError
from .layers import SwitchableNorm, width_of_private_name

__all__ = [
    "IncompatibleCheckpointError",
    "LoadSummary",
    "SlimCheckpointer",
    "summarize_load",
    "likely_causes",
    "misfit_message",
    "allow_partial_weights",
    "load_weights",
    "slim_predictor",
]

logger = logging.getLogger(__name__)

SHOWN_KEYS = 5  # keys listed in the error
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# detectron2's ResNet layouts: blocks in res2..res5 and block kind -> depth.
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
}
_BLOCK_KEY = re.compile(r"^backbone\.(?:bottom_up\.)?(res[2-5])\.(\d+)\.([^.]+)\.")
_PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.",
               "roi_heads.keypoint_head.score_lowres.")
_NO_PART_CAUSES = {
    "roi_heads.mask_head": "it was trained without masks (set MODEL.MASK_ON False to evaluate "
                           "its boxes)",
    "roi_heads.keypoint_head": "it was trained without keypoints (set MODEL.KEYPOINT_ON False)",
}


class IncompatibleCheckpointError(InputError):
    """A checkpoint that leaves model tensors unloaded, refused for evaluation-type uses."""


def _shape(shape):
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


@dataclass(frozen=True)
class LoadSummary:
    """What loading one checkpoint into a model filled.

    Attributes:
        path (str): the checkpoint.
        total (int): tensors in the model's state dict (parameters and persistent buffers).
        missing (tuple[str]): model keys the checkpoint has no tensor for.
        mismatched (tuple[tuple[str, tuple, tuple]]): (key, checkpoint shape, model shape) of the
            tensors skipped for their shape.
        unused (tuple[str]): checkpoint keys the model has no tensor for.
        derived (tuple[str]): model keys the slim model fills itself (private norms of widths the
            checkpoint has none for).
    """

    path: str
    total: int
    missing: tuple
    mismatched: tuple
    unused: tuple
    derived: tuple

    @property
    def loaded(self):
        """How many model tensors came from the checkpoint."""
        return self.total - len(self.missing) - len(self.mismatched) - len(self.derived)

    @property
    def foreign_backbone(self):
        """Checkpoint backbone tensors without a place in the model (e.g. a deeper backbone's)."""
        return tuple(k for k in self.unused if k.startswith("backbone."))

    @property
    def fits(self):
        """Whether every model tensor was loaded or derived and the backbones agree."""
        return not (self.missing or self.mismatched or self.foreign_backbone)

    @property
    def not_loaded(self):
        """How many model tensors kept their initial values (missing or of another shape)."""
        return len(self.missing) + len(self.mismatched)

    def line(self):
        """One log line: tensors loaded, missing, mismatched, unused (and derived)."""
        derived = (f" ({len(self.derived)} private-norm tensors derived by the slim model)"
                   if self.derived else "")
        return (f"Loaded {self.loaded} of {self.total} model tensors from {self.path}{derived}: "
                f"{len(self.missing)} missing, {len(self.mismatched)} of another shape, "
                f"{len(self.unused)} checkpoint tensors unused.")


def _private_norm_keys(model):
    """{key: (norm, private name, tensor name)} for every private-norm tensor of ``model``."""
    keys = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, SwitchableNorm):
            continue
        for name, private in module.private.items():
            for tensor in private.state_dict():
                keys[f"{prefix}.private.{name}.{tensor}"] = (module, name, tensor)
    return keys


def summarize_load(model, path, incompatible):
    """Account for one checkpoint load from fvcore's ``_IncompatibleKeys``.

    Must run right after the load: it reads what each `SwitchableNorm` recorded of it.

    Args:
        model (nn.Module): the model just loaded (not wrapped in DDP).
        path (str): the checkpoint.
        incompatible (_IncompatibleKeys): what ``Checkpointer._load_model`` returned.

    Returns:
        LoadSummary
    """
    mismatched = tuple((k, tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes)
    skipped = {k for k, _, _ in mismatched}
    missing = set(_filter_reused_missing_keys(model, list(incompatible.missing_keys))) - skipped
    derived = []
    for key, (norm, name, tensor) in _private_norm_keys(model).items():
        try:
            width = width_of_private_name(name)
        except ValueError:
            continue  # not a width's norm: the checkpoint's own (a calibrated configuration's)
        if norm.checkpoint_widths is None or width in norm.checkpoint_widths:
            continue  # loaded from the checkpoint's own private norm (or not loaded at all)
        if key not in missing:
            derived.append(key)  # sliced from the full norm
        elif name in norm.missing_stats and tensor in _STATISTICS:
            derived.append(key)  # calibrated before that width runs, or the width is refused
            missing.discard(key)
    # BN's step counter changes no output; FrozenBN checkpoints do not have it.
    missing = {k for k in missing if not k.endswith(".num_batches_tracked")}
    order = list(model.state_dict())
    return LoadSummary(
        path=str(path),
        total=len(order),
        missing=tuple(k for k in order if k in missing),
        mismatched=mismatched,
        unused=tuple(incompatible.unexpected_keys),
        derived=tuple(sorted(derived)),
    )


def _layout(keys):
    """{stage: (blocks, kind)} of a ResNet-like backbone's keys (kind: its blocks' layer names)."""
    children = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index, child = match.groups()
            children.setdefault(stage, {}).setdefault(int(index), set()).add(child)
    layout = {}
    for stage, blocks in children.items():
        names = set().union(*blocks.values()) - {"shortcut"}
        kind = ("bottleneck" if "conv3" in names else "basic" if names == {"conv1", "conv2"}
                else "/".join(sorted(names)))
        layout[stage] = (max(blocks) + 1, kind)
    return layout


def _describe_layout(layout):
    stages = sorted(layout)
    counts = tuple(layout[s][0] for s in stages)
    kinds = {layout[s][1] for s in stages}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    text = f"{', '.join(map(str, counts))} {kind} blocks in {stages[0]}-{stages[-1]}"
    full = stages == ["res2", "res3", "res4", "res5"]
    depth = _RESNET_DEPTHS.get((counts, kind)) if full else None
    return text + (f" (ResNet-{depth})" if depth else "")


def _predictor_mismatch(mismatched):
    """(key, checkpoint count, model count) of classes / keypoints from a mismatched predictor."""
    counts = {}
    for key, theirs, ours in mismatched:
        if key.endswith("box_predictor.cls_score.weight"):
            counts[0] = (key, theirs[0] - 1, ours[0] - 1)  # + background
        elif key.endswith("box_predictor.bbox_pred.weight") and theirs[0] % 4 == ours[0] % 4 == 0:
            counts[1] = (key, theirs[0] // 4, ours[0] // 4)  # class-specific boxes
        elif key.startswith("roi_heads.mask_head.predictor.weight"):
            counts[2] = (key, theirs[0], ours[0])
        elif key.startswith("roi_heads.keypoint_head.score_lowres.weight") and len(theirs) > 1:
            counts[3] = (key, theirs[1], ours[1])  # ConvTranspose2d: (in, out, kh, kw)
    counts = {i: c for i, c in counts.items() if c[1] != c[2]}  # not just narrower inputs
    return counts[min(counts)] if counts else None


def _part(key):
    parts = key.split(".")
    if parts[0] == "backbone":
        return "backbone.bottom_up" if parts[1] == "bottom_up" else "backbone FPN"
    if parts[0] == "roi_heads" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def likely_causes(summary, model_shapes, cfg=None):
    """The recognisable reasons a checkpoint does not fit, most telling first.

    Args:
        summary (LoadSummary): the load.
        model_shapes (dict[str, tuple]): the model's state-dict shapes.
        cfg (CfgNode or None): the model's config, to name the keys that differ.

    Returns:
        list[str]: one sentence per cause found (empty when none is recognised).
    """
    causes = []
    model_keys = set(model_shapes)
    # BN step counters are not counted as missing, so they say nothing about the checkpoint.
    present = {k for k in model_keys - set(summary.missing)
               if not k.endswith("num_batches_tracked")}
    checkpoint_keys = present | set(summary.unused)
    # Parts of the model the checkpoint has nothing for.
    parts = {}
    for key in model_keys:
        parts.setdefault(_part(key), []).append(key in checkpoint_keys)
    empty = sorted(p for p, found in parts.items() if not any(found))
    if len(empty) == len(parts):
        causes.append("it shares no tensor name with this model: a checkpoint of another "
                      "architecture, or not a detectron2 model's")
        return causes
    heads = [p for p in empty if p not in _NO_PART_CAUSES]
    if heads and "backbone.bottom_up" not in empty:
        causes.append(
            f"it holds no weights for {', '.join(heads)}: backbone-only weights (ImageNet, or "
            "another stock checkpoint without the detector's heads), which initialise training; "
            "evaluate the model trained from them")
    for part in empty:
        if part in _NO_PART_CAUSES:
            causes.append(f"it has no {part}: {_NO_PART_CAUSES[part]}")

    ours, theirs = _layout(model_keys), _layout(checkpoint_keys)
    other_depth = bool(theirs) and ours != theirs
    if other_depth:
        depth = ""
        if cfg is not None and "RESNETS" in cfg.MODEL and "resnet" in cfg.MODEL.BACKBONE.NAME:
            depth = f"; MODEL.RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH}"
        causes.append(f"another depth: the checkpoint's backbone has {_describe_layout(theirs)}, "
                      f"the model's {_describe_layout(ours)}{depth}")

    predictor = _predictor_mismatch(summary.mismatched)
    if predictor is not None:
        key, theirs_count, ours_count = predictor
        keypoints = "keypoint" in key
        what = "keypoints" if keypoints else "classes"
        setting = ("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS" if keypoints
                   else "MODEL.ROI_HEADS.NUM_CLASSES")
        if cfg is not None:
            value = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS if keypoints else \
                cfg.MODEL.ROI_HEADS.NUM_CLASSES
            setting += f" {value}"
        causes.append(f"another number of {what}: the checkpoint's {key.rsplit('.', 1)[0]} has "
                      f"{theirs_count} {what}, the model's {ours_count} ({setting})")

    rest = [m for m in summary.mismatched if not m[0].startswith(_PREDICTORS)]
    if rest and not other_depth:
        narrower = all(len(c) == len(m) and all(a <= b for a, b in zip(c, m)) for _, c, m in rest)
        wider = all(len(c) == len(m) and all(a >= b for a, b in zip(c, m)) for _, c, m in rest)
        if all(".private." in k for k, _, _ in rest):
            causes.append("per-width norms (private.w*) of other channel counts: trained with "
                          "another MODEL.SLIM.DIVISOR, FPN_MIN_WIDTH or SCOPE")
        elif narrower:
            ratio = statistics.median(min(a / b for a, b in zip(c, m) if a != b)
                                      for _, c, m in rest)
            causes.append(
                f"other widths: the checkpoint's tensors are narrower than the model's (about "
                f"{ratio:.2g} of their channels), as those of a model of one width: an "
                "individually trained model (evaluate it with its MODEL.SLIM.INDIVIDUAL_WIDTH) or "
                "an export of tools/export_width.py (load that with slim_det.export.load_exported)")
        elif wider:
            causes.append("other channel counts: the checkpoint's tensors are wider than the "
                          "model's (e.g. another RESNETS.RES2_OUT_CHANNELS, WIDTH_PER_GROUP, "
                          "FPN.OUT_CHANNELS or ROI head dimension, or MODEL.SLIM.INDIVIDUAL_WIDTH "
                          "set for a full model's checkpoint)")
        else:
            causes.append("other channel counts or layer types in "
                          f"{', '.join(sorted({_part(k) for k, _, _ in rest}))}")
    return causes


def misfit_message(summary, model_shapes, cfg=None):
    """The error text for a load that does not fit (see `IncompatibleCheckpointError`).

    Args:
        summary (LoadSummary): the load; ``summary.fits`` is False.
        model_shapes (dict[str, tuple]): the model's state-dict shapes.
        cfg (CfgNode or None): the model's config, to name the keys that differ.

    Returns:
        str: the checkpoint, how many tensors did not fit, the first keys with both shapes, the
        likely cause and what to do.
    """
    counts = (f"{summary.not_loaded} of the model's {summary.total} tensors did not load "
              f"({len(summary.missing)} missing from the checkpoint, {len(summary.mismatched)} of "
              "another shape)")
    foreign = summary.foreign_backbone
    if foreign:
        counts += (f" and {len(foreign)} tensors of the checkpoint's backbone have no place in "
                   "the model")
    lines = [f"Checkpoint {summary.path} does not fit this model: {counts}."]
    shown = [(k, f"checkpoint {_shape(c)}, model {_shape(m)}") for k, c, m in summary.mismatched]
    shown += [(k, f"not in the checkpoint, model {_shape(model_shapes[k])}")
              for k in summary.missing]
    shown += [(k, "in the checkpoint, not in the model") for k in foreign]
    # Private norms follow their full norm: list the layers themselves first.
    shown.sort(key=lambda item: ".private." in item[0])
    lines += [f"  {key}: {what}" for key, what in shown[:SHOWN_KEYS]]
    if len(shown) > SHOWN_KEYS:
        lines.append(f"  ... and {len(shown) - SHOWN_KEYS} more")
    causes = likely_causes(summary, model_shapes, cfg)
    if causes:
        lines.append("Likely cause: " + "; ".join(causes) + ".")
    lines.append(
        "Evaluating, exporting, calibrating or running it would use initial (random) values for "
        "those tensors. Use the checkpoint trained with this config (or its own config), or set "
        "MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS True to go on with the tensors that fit."
    )
    return "\n".join(lines)


class SlimCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` that records what each load filled (``last_load``).

    ``last_load`` is the `LoadSummary` of the last `load` (None when it loaded nothing, e.g. an
    empty path). A local path that is not a file is an `InputError` naming it, instead of
    fvcore's assertion.
    """

    last_load = None

    def load(self, path, *args, **kwargs):
        """As `DetectionCheckpointer.load`; records `last_load`."""
        self.last_load = None
        if path and "://" not in path and not os.path.isfile(path):
            raise InputError(f"Checkpoint {path!r} (MODEL.WEIGHTS) is not a file; give a .pth / "
                             ".pkl checkpoint, a URL, or '' for no weights.")
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if incompatible is not None:
            self.last_load = summarize_load(self.model, self._loading, incompatible)
        return incompatible


def allow_partial_weights(cfg):
    """MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS validated (False when the key is absent).

    Raises:
        InputError: naming the value when it is not True or False.
    """
    value = cfg.MODEL.SLIM.get("ALLOW_PARTIAL_WEIGHTS", False) if "SLIM" in cfg.MODEL else False
    if not isinstance(value, bool):
        raise InputError(f"MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS must be True or False; got {value!r}.")
    return value


def load_weights(cfg, model, path=None, *, require_fit=True, resume=False, save_dir=""):
    """Load a checkpoint into ``model`` through slim_det's checkpointer and account for it.

    Args:
        cfg (CfgNode): the config the model was built from (an individual model's config loads
            through `slim_det.individual.IndividualCheckpointer`).
        model (nn.Module): the model.
        path (str or None): the checkpoint; None means ``cfg.MODEL.WEIGHTS``. Empty: nothing is
            loaded (the model keeps its initial weights; with ``require_fit`` a warning says so).
        require_fit (bool): refuse a checkpoint that leaves model tensors unloaded (evaluation,
            export, calibration, inference), unless MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS is True.
            False: load what fits, as training does.
        resume (bool): load the last checkpoint of ``save_dir`` when there is one
            (``Checkpointer.resume_or_load``).
        save_dir (str): the checkpointer's folder (for ``resume``).

    Returns:
        LoadSummary or None: None when nothing was loaded.

    Raises:
        IncompatibleCheckpointError: with ``require_fit``, when some model tensor did not load.
        InputError: for a local checkpoint path that is not a file, or a bad
            ALLOW_PARTIAL_WEIGHTS value.
    """
    from .individual import make_checkpointer  # individual imports export, which imports us

    allow = allow_partial_weights(cfg)
    path = cfg.MODEL.WEIGHTS if path is None else path
    checkpointer = make_checkpointer(cfg, model, save_dir=save_dir)
    checkpointer.resume_or_load(path, resume=resume)
    summary = checkpointer.last_load
    if summary is None:
        if require_fit:
            logger.warning("No checkpoint loaded (MODEL.WEIGHTS is empty): the model runs on its "
                           "random initial weights.")
        return None
    logger.info(summary.line())
    if require_fit and not summary.fits:
        shapes = {k: tuple(v.shape) for k, v in checkpointer.model.state_dict().items()}
        message = misfit_message(summary, shapes, cfg)
        if not allow:
            raise IncompatibleCheckpointError(message)
        logger.warning(message + "\n(Going on: MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS is True.)")
    return summary


def slim_predictor(cfg):
    """detectron2's `DefaultPredictor` for ``cfg``, with MODEL.WEIGHTS loaded by `load_weights`.

    Args:
        cfg (CfgNode): the model's config.

    Returns:
        DefaultPredictor: its model carries the checkpoint; one that does not fit is refused.

    Raises:
        IncompatibleCheckpointError: see `load_weights`.
    """
    from detectron2.engine import DefaultPredictor

    unloaded = cfg.clone()
    unloaded.defrost()
    unloaded.MODEL.WEIGHTS = ""  # DefaultPredictor's own load would accept anything
    predictor = DefaultPredictor(unloaded)
    load_weights(cfg, predictor.model)
    predictor.cfg = cfg.clone()
    return predictor
