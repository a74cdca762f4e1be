"""When `SlimTrainer` calibrates batch-norm statistics: after loading weights, before evaluating."""
import logging

from ..calibration import calibrate_from_config, report_loaded_norms, require_statistics
from ..calibration import switchable_norms, widths_without_statistics
from ..config import configured_widths, is_universal

__all__ = ["prepare_loaded_norms", "calibrate_for_evaluation"]


def prepare_loaded_norms(cfg, model, fresh_start):
    """After MODEL.WEIGHTS (or a checkpoint) is loaded into the trainer's model.

    On a fresh start from loaded weights with MODEL.SLIM.CALIBRATE_INIT_IMAGES > 0, calibrates
    every width of MODEL.SLIM.WIDTHS (random initial weights have nothing to calibrate).
    Otherwise, a checkpoint that left configured widths without statistics (private norms for
    other widths only) is refused with an error naming both width lists.
    """
    report_loaded_norms(model)
    if is_universal(cfg):
        return
    widths = configured_widths(cfg)
    images = cfg.MODEL.SLIM.CALIBRATE_INIT_IMAGES
    loaded = any(n.checkpoint_widths is not None for n in switchable_norms(model))
    if fresh_start and images > 0 and loaded:
        calibrate_from_config(cfg, model, widths, images, "MODEL.SLIM.CALIBRATE_INIT_IMAGES")
    require_statistics(model, widths, "MODEL.SLIM.CALIBRATE_INIT_IMAGES")


def calibrate_for_evaluation(cfg, model, widths):
    """Calibrate the widths among ``widths`` that have no statistics (TEST.CALIBRATION_IMAGES).

    Every width in universal mode (statistics computed for earlier weights are dropped as soon as
    training continues); untrained widths, or widths a checkpoint lacked, in switchable mode.
    Without TEST.CALIBRATION_IMAGES such widths are refused with a clear error.
    """
    missing = widths_without_statistics(model, widths)
    images = cfg.TEST.CALIBRATION_IMAGES
    if not missing:
        return
    if images <= 0:
        require_statistics(model, widths, "TEST.CALIBRATION_IMAGES")
    logging.getLogger(__name__).info(f"Widths {missing} have no batch-norm statistics yet.")
    calibrate_from_config(cfg, model, missing, images, "TEST.CALIBRATION_IMAGES")
