"""Evaluate every width in one pass over the data."""
import datetime
import logging
import statistics
import time
from contextlib import ExitStack

import torch
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm

from ..calibration import require_statistics
from ..width import get_width, set_width

__all__ = ["check_widths_supported", "inference_all_widths"]


def check_widths_supported(model, widths):
    """Raise a clear error if some of ``widths`` have no batch-norm statistics in ``model``.

    `SlimTrainer.test` calibrates such widths first when TEST.CALIBRATION_IMAGES > 0.

    Args:
        widths (Iterable[float]): the widths to run, e.g. MODEL.SLIM.TEST_WIDTHS.
    """
    require_statistics(model, widths, "TEST.CALIBRATION_IMAGES")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def inference_all_widths(model, data_loader, evaluators_by_width):
    """Run ``model`` at every width on each batch of ``data_loader``, feeding each width's evaluator.

    Loading and decoding the data once serves all widths, unlike one
    `detectron2.evaluation.inference_on_dataset` pass per width.

    Args:
        model (nn.Module): a slimmable detectron2 model; its width is restored afterwards.
        data_loader (Iterable): detectron2 test loader.
        evaluators_by_width (dict[float, DatasetEvaluator]): one evaluator per width.

    Returns:
        tuple(dict[float, dict], dict[float, float]): each width's evaluation results (empty on
        non-main processes) and its median model time per batch in milliseconds.
    """
    logger = logging.getLogger(__name__)
    check_widths_supported(model, evaluators_by_width)
    for evaluator in evaluators_by_width.values():
        evaluator.reset()
    times = {width: [] for width in evaluators_by_width}
    previous = get_width(model)
    num_batches = 0
    start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        for idx, inputs in enumerate(data_loader):
            for width, evaluator in evaluators_by_width.items():
                set_width(model, width)
                _sync()
                tic = time.perf_counter()
                outputs = model(inputs)
                _sync()
                times[width].append((time.perf_counter() - tic) * 1000.0)
                evaluator.process(inputs, outputs)
            num_batches = idx + 1
            if num_batches % 100 == 0:
                logger.info(f"Inference at {len(times)} widths: {num_batches} batches done.")
    set_width(model, previous)
    elapsed = datetime.timedelta(seconds=int(time.perf_counter() - start))
    logger.info(f"Inference at widths {list(times)} on {num_batches} batches took {elapsed}.")
    results = {}
    for width, evaluator in evaluators_by_width.items():
        result = evaluator.evaluate()
        results[width] = result if (comm.is_main_process() and result is not None) else {}
    latency = {w: statistics.median(t) if t else float("nan") for w, t in times.items()}
    return results, latency
