"""One S-Nets training step: every width on the same batch, one optimizer step."""
import contextlib
import time

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..sampling import FixedWidths
from ..width import get_width, set_width

__all__ = ["slim_forward_backward", "all_reduce_gradients", "SlimSimpleTrainer"]


def _local_grads_only(model):
    # Gradients are all-reduced once per iteration by all_reduce_gradients, not once per width.
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def slim_forward_backward(model, data, widths, iteration=None):
    """Forward and backward ``data`` at each width, largest first, accumulating gradients.

    Only one width's graph is alive at a time: each width's loss is backpropagated before the next
    width runs. The model's width is restored afterwards.

    Args:
        model (nn.Module): a slimmable detectron2 model in training mode (DDP-wrapped or not).
        data (list[dict]): one batch in detectron2's input format.
        widths (Iterable[float]): the widths to train.
        iteration (int or None): the iteration number, for error messages.

    Returns:
        dict[float, dict[str, Tensor]]: each width's detached loss dict.

    Raises:
        FloatingPointError: if a loss is not finite; names the width and the iteration.
    """
    previous = get_width(model)
    losses_by_width = {}
    try:
        for width in sorted(widths, reverse=True):
            set_width(model, width)
            with _local_grads_only(model):
                try:
                    loss_dict = model(data)
                except FloatingPointError as e:  # detectron2's own divergence checks
                    raise FloatingPointError(
                        f"Training diverged at width {width:g}, iteration={iteration}: {e}"
                    ) from e
                losses = sum(loss_dict.values())
                if not torch.isfinite(losses):
                    values = {k: float(v) for k, v in loss_dict.items()}
                    raise FloatingPointError(
                        f"Loss became infinite or NaN at width {width:g}, iteration={iteration}: "
                        f"{values}"
                    )
                losses.backward()
            losses_by_width[width] = {k: v.detach() for k, v in loss_dict.items()}
    finally:
        set_width(model, previous)
    return losses_by_width


def all_reduce_gradients(model):
    """Average gradients over all processes with one all-reduce of one flat buffer.

    A parameter that has no gradient on any process (never used) keeps ``grad = None`` so the
    optimizer leaves it alone, as DDP would.
    """
    world_size = comm.get_world_size()
    if world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor(
        [float(p.grad is not None) for p in params], device=grads[0].device, dtype=grads[0].dtype
    )
    flat = _flatten_dense_tensors(grads + [has_grad])
    dist.all_reduce(flat)
    reduced = _unflatten_dense_tensors(flat, grads + [has_grad])
    for param, grad, used in zip(params, reduced[:-1], reduced[-1].tolist()):
        if used > 0:
            param.grad = grad.div_(world_size)


class SlimSimpleTrainer(SimpleTrainer):
    """detectron2's `SimpleTrainer` running S-Nets Algorithm 1 in `run_step`.

    Each iteration runs every width on the same batch (largest first, a backward per width),
    all-reduces the accumulated gradients once, and takes one optimizer step. Losses are logged per
    width (``w0.25/loss_cls``); ``total_loss`` is the sum over widths. With a width schedule
    (universal mode's sandwich rule) the widths change per iteration and are logged by label
    (``max/``, ``min/``, ``rand/``).
    """

    def __init__(self, model, data_loader, optimizer, widths, seed=None, **kwargs):
        """
        Args:
            widths (list[float] or schedule): the widths trained every iteration, or a width
                schedule (``widths_for(iteration) -> [(label, width)]``, see `slim_det.sampling`)
                choosing them per iteration; each width's losses are logged under its label.
            seed (int or None): if set, the random generators are re-seeded from (seed,
                iteration, rank) before each step, so that a resumed run samples proposals and
                anchors exactly like an uninterrupted one.
            Other arguments: see `SimpleTrainer`.
        """
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.schedule = widths if hasattr(widths, "widths_for") else FixedWidths(widths)
        self.widths = getattr(self.schedule, "widths", None)  # None when chosen per iteration
        self.seed = seed

    def run_step(self):
        assert self.model.training, "[SlimSimpleTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            # After fetching: creating the loader iterator draws from the generators too.
            step = self.iter * comm.get_world_size() + comm.get_rank()
            seed_all_rng((self.seed * 1_000_003 + step) % 2**31)

        self.optimizer.zero_grad()
        schedule = self.schedule.widths_for(self.iter)
        losses_by_width = slim_forward_backward(
            self.model, data, [width for _, width in schedule], self.iter
        )
        all_reduce_gradients(self.model)
        self.after_backward()

        loss_dict = {}
        for label, width in schedule:  # widths sharing a label (sandwich "rand") are summed
            for name, value in losses_by_width[width].items():
                key = f"{label}/{name}"
                loss_dict[key] = loss_dict[key] + value if key in loss_dict else value
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
