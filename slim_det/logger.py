"""slim_det's log lines go where detectron2's go: the terminal and OUTPUT_DIR/log.txt."""
import logging

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["setup_slim_logger"]


def setup_slim_logger(output_dir=None):
    """Configure the ``slim_det`` logger like detectron2's own (``default_setup`` does not).

    Safe to call more than once: a logger that already has handlers is left as it is.

    Args:
        output_dir (str or None): where ``log.txt`` is appended (detectron2's ``log.txt`` when it
            is the config's OUTPUT_DIR), or None for the terminal only.

    Returns:
        logging.Logger: the ``slim_det`` logger.
    """
    logger = logging.getLogger("slim_det")
    if logger.handlers:
        return logger
    return setup_logger(output=output_dir, distributed_rank=comm.get_rank(), name="slim_det")
