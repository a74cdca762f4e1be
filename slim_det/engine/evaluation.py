"""Evaluate every width in one pass over the data."""
import datetime
import logging
import statistics
import time
from contextlib import ExitStack

import torch
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm

from ..layers import SwitchableNorm
from ..width import get_width, set_width

__all__ = ["check_widths_supported", "inference_all_widths"]


def check_widths_supported(model, widths):
    """Raise a clear error if a switchable norm in ``model`` has no private norm for a width.

    Args:
        widths (Iterable[float]): the widths to run, e.g. MODEL.SLIM.TEST_WIDTHS.
    """
    for module in model.modules():
        if isinstance(module, SwitchableNorm):
            missing = [w for w in widths if w < 1.0 and w not in module.widths]
            if missing:
                raise ValueError(
                    f"Cannot evaluate widths {missing}: the model's switchable norms were trained "
                    f"for widths {list(module.widths)} only (MODEL.SLIM.WIDTHS). Set "
                    "MODEL.SLIM.TEST_WIDTHS to a subset of them."
                )
            return


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
