"""One S-Nets training step: every width on the same batch, one optimizer step."""
import contextlib
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..channels import apply_setting, current_setting
from ..config import LOSS_REDUCTIONS
from ..sampling import FixedWidths
from ..width import width_key

__all__ = [
    "LOSS_REDUCTIONS",
    "slim_forward_backward",
    "all_reduce_gradients",
    "clip_grad_norm",
    "SlimSimpleTrainer",
]


def _local_grads_only(model):
    # Gradients are all-reduced once per iteration by all_reduce_gradients, not once per width.
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def slim_forward_backward(model, data, widths, iteration=None, reduction="sum", scopes=None,
                          after_width=None, weights=None):
    """Forward and backward ``data`` at each width, largest first, accumulating gradients.

    Only one width's graph is alive at a time: each width's loss is backpropagated before the next
    width runs. The model's width is restored afterwards. Whatever the model logs to the event
    storage during a width's pass (e.g. ``fast_rcnn/fg_cls_accuracy``) is logged under that
    width's prefix (``w0.5/fast_rcnn/fg_cls_accuracy``).

    Args:
        model (nn.Module): a slimmable detectron2 model in training mode (DDP-wrapped or not).
        data (list[dict]): one batch in detectron2's input format.
        widths (Iterable[float or ChannelConfig]): the widths to train; a channel configuration
            (`slim_det.channels.ChannelConfig`) trains that non-uniform network and is keyed by
            its ``name`` in ``scopes``, ``weights`` and the result.
        iteration (int or None): the iteration number, for error messages.
        reduction (str): "sum" backpropagates each width's loss as it is (S-Nets Algorithm 1);
            "mean" scales each by 1 / len(widths), so the shared weights get the gradient of
            one width on average instead of the sum of all.
        scopes (dict[float, str] or None): the metric prefix of each width; default
            ``w0.5`` etc. (a width schedule's labels, e.g. the sandwich rule's "rand", keep
            randomly drawn widths from creating new metric names every iteration).
        after_width (callable or None): called as ``after_width(width, loss_dict)`` right after
            each width's backward, e.g. to measure that width's share of the gradients.
        weights (dict[float, float] or None): a factor per width on its loss before the
            reduction (MODEL.SLIM.LOSS_WEIGHTS); None means 1 for every width.

    Returns:
        dict[float or str, dict[str, Tensor]]: each width's (configuration name's) detached,
        unscaled loss dict.

    Raises:
        FloatingPointError: if a loss is not finite; names the width and the iteration.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}; got {reduction!r}.")
    widths = list(widths)
    if not any(isinstance(w, Mapping) for w in widths):
        widths = sorted(widths, reverse=True)
    scale = 1.0 / len(widths) if reduction == "mean" else 1.0
    storage = get_event_storage()
    previous = current_setting(model)
    losses_by_width = {}
    try:
        for width in widths:
            key, what = setting_key(width), _describe(width)
            apply_setting(model, width)
            with _local_grads_only(model), storage.name_scope(
                (scopes or {}).get(key, f"w{width_key(width)}" if key == width else key)
            ):
                try:
                    loss_dict = model(data)
                except FloatingPointError as e:  # detectron2's own divergence checks
                    raise FloatingPointError(
                        f"Training diverged at {what}, iteration={iteration}: {e}"
                    ) from e
                losses = sum(loss_dict.values())
                if not torch.isfinite(losses):
                    values = {k: float(v) for k, v in loss_dict.items()}
                    raise FloatingPointError(
                        f"Loss became infinite or NaN at {what}, iteration={iteration}: "
                        f"{values}"
                    )
                weight = 1.0 if weights is None else weights[key]
                (losses * (scale * weight)).backward()
            losses_by_width[key] = {k: v.detach() for k, v in loss_dict.items()}
            if after_width is not None:
                after_width(width, losses_by_width[key])
    finally:
        apply_setting(model, previous)
    return losses_by_width


def setting_key(setting):
    """The key of a width (itself) or a channel configuration (its ``name``) in loss dicts."""
    return setting.name if isinstance(setting, Mapping) else setting


def _describe(setting):
    if isinstance(setting, Mapping):
        return f"channel configuration {setting.name}"
    return f"width {setting:g}"


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


def clip_grad_norm(model, max_norm, norm_type=2.0):
    """Clip the gradient norm of all of ``model``'s parameters together (not tensor by tensor).

    This is what mmdet's ``grad_clip=dict(max_norm=35)``, used by the S-Nets paper, does;
    detectron2's ``CLIP_TYPE: "norm"`` clips each parameter tensor separately instead.

    Args:
        max_norm (float or None): the largest total norm allowed; None only measures it.
        norm_type (float): the norm's order (SOLVER.CLIP_GRADIENTS.NORM_TYPE; inf for max).

    Returns:
        float: the total gradient norm before clipping.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = float("inf") if max_norm is None else max_norm
    return float(torch.nn.utils.clip_grad_norm_(params, limit, norm_type=norm_type))


class SlimSimpleTrainer(SimpleTrainer):
    """detectron2's `SimpleTrainer` running S-Nets Algorithm 1 in `run_step`.

    Each iteration runs every width on the same batch (largest first, a backward per width),
    all-reduces the accumulated gradients once, optionally clips their global norm, and takes one
    optimizer step. Losses are logged per width (``w0.25/loss_cls``); ``total_loss`` is the sum
    over widths; ``grad_norm`` is the global gradient norm before clipping.
    With a width schedule (universal mode's sandwich rule) the widths change per iteration and
    are logged by label (``max/``, ``min/``, ``rand/``).
    """

    def __init__(self, model, data_loader, optimizer, widths, seed=None, loss_reduction="sum",
                 max_grad_norm=None, grad_norm_type=2.0, after_width=None, loss_weights=None,
                 **kwargs):
        """
        Args:
            widths (list[float] or schedule): the widths trained every iteration, or a width
                schedule (``widths_for(iteration) -> [(label, width)]``, see `slim_det.sampling`)
                choosing them per iteration; each width's losses are logged under its label.
            loss_reduction (str): how the widths' losses combine; see `slim_forward_backward`.
            loss_weights (dict[float, float] or None): each width's loss factor; see
                `slim_forward_backward` (fixed widths only).
            max_grad_norm (float or None): clip the global gradient norm to this, or None.
            grad_norm_type (float): the order of that norm.
            after_width (callable or None): see `slim_forward_backward` (diagnostics).
            seed (int or None): if set, the random generators are re-seeded from (seed,
                iteration, rank) before each step, so that a resumed run samples proposals and
                anchors exactly like an uninterrupted one.
            Other arguments: see `SimpleTrainer`.
        """
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.schedule = widths if hasattr(widths, "widths_for") else FixedWidths(widths)
        self.widths = getattr(self.schedule, "widths", None)  # None when chosen per iteration
        self.seed = seed
        self.loss_reduction = loss_reduction
        self.max_grad_norm = max_grad_norm
        self.grad_norm_type = grad_norm_type
        self.after_width = after_width
        self.loss_weights = loss_weights

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
            self.model, data, [width for _, width in schedule], self.iter, self.loss_reduction,
            scopes={setting_key(width): label for label, width in schedule},
            after_width=self.after_width, weights=self.loss_weights,
        )
        all_reduce_gradients(self.model)
        self.after_backward()  # hooks see the gradients before clipping
        # Gradients are identical on every process after the all-reduce, so is the clipping.
        grad_norm = clip_grad_norm(self.model, self.max_grad_norm, self.grad_norm_type)
        get_event_storage().put_scalar("grad_norm", grad_norm, smoothing_hint=False)

        loss_dict = {}
        for label, width in schedule:  # widths sharing a label (sandwich "rand") are summed
            for name, value in losses_by_width[setting_key(width)].items():
                key = f"{label}/{name}"
                loss_dict[key] = loss_dict[key] + value if key in loss_dict else value
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
