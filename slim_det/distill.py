"""Inplace distillation for slimmable R-CNN (MODEL.SLIM.DISTILL): narrower widths learn from the
widest width's predictions of the same iteration.

US-Nets distil a classifier's output; for a detector this module distils the two places where the
widest width (the teacher) makes a prediction the others (students) can be asked to match on the
very same inputs:

- RPN objectness on every anchor: anchors depend only on the image and feature strides, so the
  teacher's and a student's logits line up one to one. Loss: binary cross-entropy of the
  student's logits against the teacher's sigmoid probabilities, averaged over anchors.
- ROI box head on the teacher's sampled proposals: a student's ROI heads skip their own proposal
  sampling and run on the teacher's (its ground-truth ROI losses then use those proposals too).
  Class distribution: KL(teacher || student) of temperature-scaled softmaxes, times T^2, averaged
  over proposals. Box deltas: smooth L1 between the student's and the teacher's deltas of the
  ground-truth class on foreground proposals, normalised by the number of proposals as
  detectron2's box regression loss is.

The teacher trains on ground truth only and its predictions are detached, so distillation never
moves the teacher towards a student. A student keeps its own ground-truth losses, scaled by
``gt_weight`` (MODEL.SLIM.DISTILL.GT_WEIGHT; 0 drops them: the teacher is its only signal, as in
US-Nets). Everything is done with hooks installed once on the model;
the training step is unchanged: a student's distillation terms are extra entries of its loss dict
(``distill_rpn``, ``distill_cls``, ``distill_box``), logged and summed like any loss. Distillation
can start late (``start_iter``: before it the students train on ground truth alone, on their own
proposals) and ramp up linearly (``ramp_iters``: the term weights rise from 0, a student's
ground-truth weight moves from 1 to ``gt_weight``).
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from detectron2.utils.events import get_event_storage, has_event_storage
from fvcore.nn import smooth_l1_loss

from .config import configured_widths, is_universal, width_range
from .channels import current_setting

__all__ = ["InplaceDistillation", "install_inplace_distillation", "rpn_distill_loss",
           "class_distill_loss", "box_distill_loss"]


def rpn_distill_loss(student_logits, teacher_logits):
    """Mean binary cross-entropy of student objectness logits against teacher probabilities.

    Args:
        student_logits, teacher_logits (list[Tensor]): per feature level, same shapes.
    """
    student = torch.cat([s.flatten() for s in student_logits])
    teacher = torch.cat([t.flatten() for t in teacher_logits]).sigmoid()
    return F.binary_cross_entropy_with_logits(student, teacher)


def class_distill_loss(student_scores, teacher_scores, temperature):
    """KL(teacher || student) of softmax(scores / T), times T^2, averaged over proposals."""
    log_student = F.log_softmax(student_scores / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_scores / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def box_distill_loss(student_deltas, teacher_deltas, gt_classes, num_classes, beta=0.0):
    """Smooth L1 between the ground-truth class's deltas of student and teacher, on foreground.

    Args:
        student_deltas, teacher_deltas (Tensor): (R, 4) class-agnostic or (R, 4 * K).
        gt_classes (Tensor): (R,) the teacher's sampled labels; K means background.
        num_classes (int): K.
    """
    foreground = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes)).squeeze(1)
    if student_deltas.shape[1] == 4:
        columns = torch.arange(4, device=student_deltas.device).expand(len(foreground), 4)
    else:
        columns = 4 * gt_classes[foreground, None] + torch.arange(4, device=gt_classes.device)
    student = student_deltas[foreground[:, None], columns]
    teacher = teacher_deltas[foreground[:, None], columns]
    return smooth_l1_loss(student, teacher, beta, reduction="sum") / max(1, gt_classes.numel())


def _fingerprint(batch):
    # Identifies a batch across forwards; DDP may hand the module a copy of the list and dicts.
    return tuple((d.get("file_name"), d.get("image_id"), tuple(d["image"].shape)) for d in batch)


class InplaceDistillation:
    """Hooks on a GeneralizedRCNN that add inplace-distillation losses to narrower widths.

    A training forward at ``teacher_width`` records the teacher's predictions for its batch; a
    later training forward on the same batch (same images) at a narrower width is a student.
    Evaluation forwards and forwards on other batches are left alone.
    """

    def __init__(self, model, teacher_width, rpn_weight=1.0, cls_weight=1.0, box_weight=1.0,
                 temperature=1.0, gt_weight=1.0, start_iter=0, ramp_iters=0):
        model = getattr(model, "module", model)
        if not hasattr(model, "proposal_generator") or not hasattr(model, "roi_heads"):
            raise ValueError(f"Inplace distillation needs an R-CNN (GeneralizedRCNN); got "
                             f"{type(model).__name__}.")
        if not hasattr(model.roi_heads, "box_predictor"):
            raise ValueError("Inplace distillation needs StandardROIHeads-style ROI heads with a "
                             f"box_predictor; got {type(model.roi_heads).__name__}.")
        self.model, self.teacher_width = model, teacher_width
        self.weights = {"distill_rpn": rpn_weight, "distill_cls": cls_weight,
                        "distill_box": box_weight}
        self.temperature, self.gt_weight = temperature, gt_weight
        self.start_iter, self.ramp_iters = start_iter, ramp_iters
        self.strength = 1.0
        self.role, self.batch, self.teacher, self.losses = None, None, {}, {}
        roi_heads = model.roi_heads
        self._sample = roi_heads.label_and_sample_proposals
        roi_heads.label_and_sample_proposals = self._label_and_sample_proposals
        self.handles = [
            model.register_forward_pre_hook(self._before_model),
            model.register_forward_hook(self._after_model),
            model.proposal_generator.rpn_head.register_forward_hook(self._after_rpn_head),
            roi_heads.box_predictor.register_forward_hook(self._after_box_predictor),
        ]

    def remove(self):
        """Uninstall the hooks."""
        for handle in self.handles:
            handle.remove()
        del self.model.roi_heads.label_and_sample_proposals  # the class method again

    def schedule(self, iteration):
        """How strongly distillation acts at ``iteration``: 0 before ``start_iter``, then rising
        linearly to 1 over ``ramp_iters`` iterations (at once for 0)."""
        if iteration < self.start_iter:
            return 0.0
        if self.ramp_iters == 0:
            return 1.0
        return min(1.0, (iteration - self.start_iter + 1) / self.ramp_iters)

    def _before_model(self, module, args):
        self.role, self.losses = None, {}
        if not module.training or not args:
            return
        # Outside a training loop (a hand-made step) there is no iteration: full strength.
        self.strength = (self.schedule(get_event_storage().iter) if has_event_storage()
                         else 1.0)
        if self.strength == 0:  # not started: the students train on ground truth alone
            return
        setting = current_setting(module)
        batch = _fingerprint(args[0])
        # A channel configuration (MODEL.SLIM.SAMPLING "per_group") is always a student.
        if not isinstance(setting, Mapping) and setting >= self.teacher_width:
            self.role, self.batch, self.teacher = "teacher", batch, {}
        elif batch == self.batch and self.teacher:
            self.role = "student"

    def _after_model(self, module, args, output):
        if self.role == "student" and isinstance(output, dict):
            # Dropped rather than zeroed at 0: a logged 0 would read as a classifier that never
            # learned to the divergence checks.
            gt_weight = 1.0 + self.strength * (self.gt_weight - 1.0)
            output = {name: value * gt_weight for name, value in output.items() if gt_weight > 0}
            for name, value in self.losses.items():
                if self.weights[name] > 0:
                    output[name] = value * (self.weights[name] * self.strength)
        self.role = None
        return output

    def _after_rpn_head(self, module, args, output):
        logits = output[0]
        if self.role == "teacher":
            self.teacher["rpn"] = [t.detach() for t in logits]
        elif self.role == "student":
            self.losses["distill_rpn"] = rpn_distill_loss(logits, self.teacher["rpn"])

    def _label_and_sample_proposals(self, proposals, targets):
        if self.role == "student" and "proposals" in self.teacher:
            return self.teacher["proposals"]
        sampled = self._sample(proposals, targets)
        if self.role == "teacher":
            self.teacher["proposals"] = sampled
        return sampled

    def _after_box_predictor(self, module, args, output):
        scores, deltas = output[0], output[1]
        if self.role == "teacher":
            self.teacher["scores"], self.teacher["deltas"] = scores.detach(), deltas.detach()
        elif self.role == "student" and "scores" in self.teacher:
            gt_classes = torch.cat([p.gt_classes for p in self.teacher["proposals"]])
            self.losses["distill_cls"] = class_distill_loss(
                scores, self.teacher["scores"], self.temperature)
            self.losses["distill_box"] = box_distill_loss(
                deltas, self.teacher["deltas"], gt_classes, scores.shape[1] - 1,
                self.model.roi_heads.box_predictor.smooth_l1_beta)


def install_inplace_distillation(cfg, model):
    """Install `InplaceDistillation` on ``model`` if MODEL.SLIM.DISTILL.ENABLED; else None.

    The teacher is the widest trained width: 1.0 (switchable) or MODEL.SLIM.WIDTH_RANGE's max.
    """
    distill = cfg.MODEL.SLIM.DISTILL
    if not distill.ENABLED:
        return None
    teacher = width_range(cfg)[1] if is_universal(cfg) else configured_widths(cfg)[-1]
    return InplaceDistillation(model, teacher, distill.RPN_WEIGHT, distill.CLS_WEIGHT,
                               distill.BOX_WEIGHT, distill.TEMPERATURE, distill.GT_WEIGHT,
                               distill.START_ITER, distill.RAMP_ITERS)
