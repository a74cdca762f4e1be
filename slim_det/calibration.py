"""Batch-norm calibration: per-width statistics measured on training images (US-Nets).

A width's statistics are reset and re-accumulated as the exact mean and variance of every norm's
input over the calibration images, at that width. During calibration only the norms run in train
mode (they normalise with batch statistics, as in training, and record what they see); the rest
of the model runs as at test time, without gradients. Forgetting train mode is the classic bug
that makes calibration a no-op: here a norm outside train mode records nothing, and calibrating
without any record is an error.

Calibrated statistics stay in the model (see `slim_det.layers.SwitchableNorm`): they are saved in
checkpoints and survive `set_width`.
"""
import logging
import random
from collections.abc import Mapping

import torch
import torch.distributed as dist
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils import comm
from torch.nn.modules.batchnorm import _BatchNorm

from .channels import apply_setting, current_setting, set_channels
from .layers import SwitchableNorm, is_configuration_name, private_norm_width
from .width import check_width

__all__ = [
    "calibrate_norms",
    "switchable_norms",
    "widths_without_statistics",
    "widths_with_statistics",
    "use_shared_statistics",
    "require_statistics",
    "build_calibration_loader",
    "calibrate_from_config",
    "report_loaded_norms",
]

logger = logging.getLogger(__name__)


def _unwrap(model):
    return getattr(model, "module", model)


def switchable_norms(model):
    """The switchable (or universal) batch norms of ``model``, in module order."""
    return [m for m in _unwrap(model).modules() if isinstance(m, SwitchableNorm)]


def widths_without_statistics(model, widths):
    """The widths among ``widths`` (descending) at which some norm has no statistics to evaluate."""
    norms = switchable_norms(model)
    return sorted({float(w) for w in widths if any(not n.has_statistics(w) for n in norms)},
                  reverse=True)


def widths_with_statistics(model):
    """The widths (ascending) at which every switchable norm of ``model`` has statistics: the
    trained widths of a switchable model and every calibrated width (the only ones of a
    universal model). None for a model without switchable norms (any width runs)."""
    norms = switchable_norms(model)
    if not norms:
        return None
    candidates = set()
    for norm in norms:
        candidates |= {float(w) for w in norm.widths} | {1.0}
        candidates |= {private_norm_width(name) for name in norm.private
                       if not is_configuration_name(name)}
    return sorted(w for w in candidates if all(n.has_statistics(w) for n in norms))


def use_shared_statistics(model, widths):
    """The uncalibrated baseline of a universally slimmable model, for comparisons.

    Every width of ``widths`` gets the shared norms' running statistics, sliced: the statistics
    BN accumulated during training, a moving average over whichever widths were drawn, which is
    what a US-Net evaluated without calibration would use. They replace any calibrated
    statistics of those widths (and are dropped, like calibrated ones, by a training forward).

    Returns:
        nn.Module: ``model``, in eval mode.
    """
    widths = [check_width(w) for w in widths]
    for norm in switchable_norms(model):
        norm.use_shared_statistics(widths)
    return _unwrap(model).eval()


@torch.no_grad()
def calibrate_norms(model, data_loader, widths, num_images):
    """Calibrate the batch-norm statistics of ``model`` at each of ``widths``.

    For each width, that width's statistics of every batch norm (BN, SyncBN, FrozenBN; FrozenBN
    keeps its affine) are replaced by the exact mean and unbiased variance of the norm's input
    over ``num_images`` images, summed over all processes. One pass over the data serves every
    width. A width without statistics of its own gets a calibrated private norm (affine copied
    from the full norm, sliced). Models without batch norms (GroupNorm or no norm) need nothing.

    Args:
        model (nn.Module): a slimmable detectron2 model (DDP-wrapped or not).
        data_loader (Iterable[list[dict]]): batches in detectron2's input format, with test-time
            transforms, e.g. from `build_calibration_loader`.
        widths (Iterable[float | Mapping]): the widths to calibrate; an item may also be a
            channel configuration (see `slim_det.set_channels`), whose statistics are then kept
            under that configuration's name.
        num_images (int): images to use per process; fewer if the loader ends first.

    Returns:
        nn.Module: ``model``, in eval mode, at the width it had before.

    Raises:
        RuntimeError: if no norm recorded anything (empty loader, or norms not in train mode).
    """
    model = _unwrap(model)
    configurations = [w for w in widths if isinstance(w, Mapping)]
    widths = sorted({check_width(w) for w in widths if not isinstance(w, Mapping)}, reverse=True)
    if configurations:
        configurations = [set_channels(model, c) for c in configurations]
    settings = widths + configurations
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer; got {num_images!r}.")
    norms = switchable_norms(model)
    if not norms:
        logger.info("The model has no batch norm (GroupNorm or no norm): its statistics do not "
                    "depend on the width, so no calibration is needed.")
        return model.eval()
    inside = {id(m) for n in norms for m in n.modules()}
    fixed = [m for m in model.modules()
             if isinstance(m, (_BatchNorm, FrozenBatchNorm2d)) and id(m) not in inside]
    if fixed:
        logger.warning(f"{len(fixed)} batch norms are not switchable (outside MODEL.SLIM.SCOPE): "
                       "they keep one set of statistics for every width and are not calibrated.")
    previous = current_setting(model)
    model.eval()
    for setting in settings:
        apply_setting(model, setting)
        for norm in norms:
            norm.start_calibration_of_current()
    images = 0
    # When every batch norm is in the backbone (the usual R-CNN: heads without norms), the heads'
    # forward changes no statistic: run the backbone alone on the same preprocessed images.
    backbone = getattr(model, "backbone", None)
    inside_backbone = set() if backbone is None else {id(m) for m in backbone.modules()}
    backbone_only = hasattr(model, "preprocess_image") and all(
        id(n) in inside_backbone for n in norms)
    try:
        _train_norms(norms)
        for batch in data_loader:
            tensor = model.preprocess_image(batch).tensor if backbone_only else None
            for setting in settings:
                apply_setting(model, setting)
                if backbone_only:
                    backbone(tensor)
                else:
                    model(batch)
            images += len(batch)
            if images >= num_images:
                break
        _all_reduce([t for norm in norms for t in norm.calibration_tensors()])
        if not any(float(t) > 0 for norm in norms for t in norm.calibration_tensors()[::3]):
            raise RuntimeError(
                f"Calibration recorded no statistics at {_describe(settings)} ({images} images "
                "loaded): the loader was empty or the norms were not in train mode."
            )
    except BaseException:
        for norm in norms:
            norm.abort_calibration()
        raise
    finally:
        model.eval()
        apply_setting(model, previous)
    empty = {}
    for name, module in model.named_modules():
        if isinstance(module, SwitchableNorm):
            for private in module.finish_calibration():
                empty.setdefault(private, []).append(name)
    for private, names in empty.items():
        logger.warning(f"Setting {private}: {len(names)} norms saw no data during calibration "
                       f"and keep their previous statistics, e.g. {names[:3]}.")
    logger.info(f"Calibrated the statistics of {len(norms)} batch norms at "
                f"{_describe(settings)} on {images} images (per process).")
    return model


def _describe(settings):
    widths = [f"{s:g}" for s in settings if not isinstance(s, Mapping)]
    configurations = [s.name for s in settings if isinstance(s, Mapping)]
    parts = [f"widths {widths}"] if widths else []
    return " and ".join(parts + ([f"channel configurations {configurations}"]
                                 if configurations else []))


def _train_norms(norms):
    # Only the norms: they normalise with batch statistics and record them. Everything else
    # stays in eval mode (test-time proposals, no dropout-like behaviour).
    for norm in norms:
        norm.train()


def _all_reduce(tensors):
    if comm.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def build_calibration_loader(cfg, num_images):
    """A loader over ``num_images`` training images (DATASETS.TRAIN) with test-time transforms.

    The images are a fixed random sample (seed 0) of the training set, the same every call, split
    over processes; batches hold SOLVER.IMS_PER_BATCH / processes images, as training batches do,
    so the batch statistics the norms normalise with during calibration resemble training's.

    Returns:
        tuple(Iterable, int): the loader and the number of images each process gets (at most).
    """
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if num_images > len(dicts):
        logger.warning(f"Calibration asked for {num_images} images; {cfg.DATASETS.TRAIN} has "
                       f"{len(dicts)}: using all of them.")
        num_images = len(dicts)
    chosen = sorted(random.Random(0).sample(range(len(dicts)), num_images))
    world = comm.get_world_size()
    loader = build_detection_test_loader(
        [dicts[i] for i in chosen],
        mapper=DatasetMapper(cfg, is_train=False),
        batch_size=max(1, cfg.SOLVER.IMS_PER_BATCH // world),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    return loader, -(-num_images // world)


def calibrate_from_config(cfg, model, widths, num_images, key):
    """Calibrate ``widths`` on ``num_images`` training images; log why (``key`` asked for it).

    The model's train / eval mode is restored afterwards.
    """
    was_training = _unwrap(model).training
    logger.info(f"Calibrating batch-norm statistics at {_describe(list(widths))} on "
                f"{num_images} images of {cfg.DATASETS.TRAIN} ({key} {num_images}).")
    loader, per_process = build_calibration_loader(cfg, num_images)
    calibrate_norms(model, loader, widths, per_process)
    _unwrap(model).train(was_training)
    return model


def require_statistics(model, widths, key):
    """Raise a clear error if some of ``widths`` lack statistics; ``key`` would calibrate them."""
    missing = widths_without_statistics(model, widths)
    if not missing:
        return
    norm = next(n for n in switchable_norms(model) if any(not n.has_statistics(w) for w in missing))
    if norm.universal:
        why = "a universally slimmable model has no per-width statistics until calibrated"
    elif norm.missing_stats:
        why = (f"the loaded checkpoint has norms for widths {norm.checkpoint_widths}, the config "
               f"(MODEL.SLIM.WIDTHS) {list(norm.widths)}")
    else:
        why = f"the model's switchable norms were trained for widths {list(norm.widths)} only"
    raise ValueError(
        f"Widths {missing} have no batch-norm statistics: {why}. Set {key} > 0 to calibrate them "
        "on training images, or use widths that have statistics."
    )


def report_loaded_norms(model):
    """Log how the last checkpoint load filled the switchable norms; return the widths it lacked.

    A checkpoint without any private norm (stock detectron2 / ImageNet) starts every width from
    the full norm, sliced. A checkpoint with private norms for other widths than the config's
    leaves those widths without statistics (see `require_statistics`).
    """
    norms = [n for n in switchable_norms(model) if n.checkpoint_widths is not None]
    if not norms:
        return []
    if not norms[0].universal and all(n.sliced_from_full for n in norms):
        logger.info(f"The checkpoint has no per-width norms (stock or ImageNet weights): the "
                    f"{len(norms)} switchable norms start every width from the full norm, sliced.")
    missing = sorted({w for n in norms for w in n.widths if not n.has_statistics(w)})
    if missing:
        logger.warning(f"The checkpoint has norms for widths {norms[0].checkpoint_widths}; "
                       f"widths {missing} of MODEL.SLIM.WIDTHS have no statistics.")
    return missing
