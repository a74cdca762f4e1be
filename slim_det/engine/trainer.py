"""`SlimTrainer`: detectron2's DefaultTrainer, training all widths and evaluating every width."""
import itertools
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.evaluation import print_csv_format
from detectron2.structures import ImageList
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..analysis import detector_costs
from ..config import individual_width, slim_settings, test_widths, width_loss_weights
from ..distill import install_inplace_distillation
from ..individual import build_individual_model, make_checkpointer
from ..logger import setup_slim_logger
from ..roi_align import use_parallel_roi_align_
from ..sampling import FixedWidths, build_width_schedule
from ..solver import build_optimizer
from ..width import using_width, width_key
from .calibration_hooks import calibrate_for_evaluation, prepare_loaded_norms
from .evaluation import inference_all_widths
from .evaluators import build_evaluator
from .report import format_width_table, save_width_report, width_rows
from .divergence import DivergenceMonitor
from .train_loop import SlimSimpleTrainer

__all__ = ["SlimTrainer", "create_slim_ddp_model"]


def create_slim_ddp_model(model):
    """Wrap ``model`` in DistributedDataParallel when there are several processes.

    Unlike detectron2's `create_ddp_model`, passes ``device_ids=None`` for a CPU model (gloo),
    which DDP requires. DDP only broadcasts the initial weights here: `SlimSimpleTrainer` runs
    every width under ``no_sync`` and all-reduces gradients once per iteration itself, so other
    widths' private norms being unused in a forward pass never trips DDP.
    """
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    device_ids = [comm.get_local_rank()] if on_gpu else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class _ContinuedTrainingSampler(TrainingSampler):
    """detectron2's `TrainingSampler`, skipping the first ``start`` indices of its global stream."""

    def __init__(self, size, start=0, seed=None):
        super().__init__(size, shuffle=True, seed=seed)
        self._start = start

    def __iter__(self):
        yield from itertools.islice(
            self._infinite_indices(), self._start + self._rank, None, self._world_size
        )


def _padded_size(model, batch):
    """(height, width) of ``batch``'s first image as the model pads it for its backbone."""
    if not hasattr(model, "preprocess_image"):  # SemanticSegmentor pads inside its forward
        backbone = model.backbone
        return tuple(ImageList.from_tensors(
            [batch[0]["image"]], backbone.size_divisibility,
            padding_constraints=backbone.padding_constraints).tensor.shape[-2:])
    with torch.no_grad():
        return tuple(model.preprocess_image(batch[:1]).tensor.shape[-2:])


def cost_caption(image_size, cfg, model=None):
    """The sentence under the table that says what its cost columns count.

    Args:
        model (nn.Module or None): the model costed, to name the heads it has (R-CNN ROI heads,
            a dense head like RetinaNet's, a semantic head); None: an R-CNN's.
    """
    model = _unwrap(model) if model is not None else None

    def has(part):
        return getattr(model, part, None) is not None

    heads = []
    if model is None or has("roi_heads"):
        heads.append(f"heads counted on a fixed {cfg.MODEL.RPN.POST_NMS_TOPK_TEST} proposals and "
                     f"{cfg.TEST.DETECTIONS_PER_IMAGE} detections (the config's maxima), not on "
                     "what the model detects")
    if has("head"):
        heads.append("the dense head on every feature level, without post-processing")
    if has("sem_seg_head"):
        heads.append("the semantic head without its upsampling")
    return (
        f"GFLOPs (fvcore, one multiply-add = one FLOP) and params on one {image_size[0]}x"
        f"{image_size[1]} input, {', '.join(heads)}; 'backbone GFLOPs' is backbone + FPN. "
        "Latency: median model time per test batch."
    )


def _global_clipping(cfg):
    clip = cfg.SOLVER.CLIP_GRADIENTS
    return clip.ENABLED and clip.CLIP_TYPE == "full_model"


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class SlimTrainer(DefaultTrainer):
    """Trains every width of MODEL.SLIM.WIDTHS each iteration; evaluates every test width.

    Differs from `DefaultTrainer` in the inner trainer (`SlimSimpleTrainer`), the DDP wrapping
    (`create_slim_ddp_model`), `build_evaluator` (detectron2's evaluators for the dataset, the
    COCO one with the config's keypoint OKS sigmas) and `test` (all widths in one pass, one
    metrics prefix per width, a results table).
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        setup_slim_logger(cfg.OUTPUT_DIR)
        if cfg.SOLVER.AMP.ENABLED:
            raise ValueError("SOLVER.AMP.ENABLED=True is not supported by SlimTrainer; set False.")
        if cfg.TEST.PRECISE_BN.ENABLED:
            raise ValueError(
                "TEST.PRECISE_BN.ENABLED=True would recompute BN statistics at one width only; "
                "set it to False (switchable norms keep per-width statistics)."
            )
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        slim_settings(cfg)
        model = self.build_model(cfg)
        schedule = build_width_schedule(cfg, model)
        self.distillation = install_inplace_distillation(cfg, model)  # None unless enabled
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_slim_ddp_model(model)
        seed = cfg.SEED if cfg.SEED >= 0 else None
        clip = cfg.SOLVER.CLIP_GRADIENTS
        self._trainer = SlimSimpleTrainer(
            model, data_loader, optimizer, schedule, seed=seed,
            loss_reduction=cfg.MODEL.SLIM.LOSS_REDUCTION, loss_weights=width_loss_weights(cfg),
            max_grad_norm=clip.CLIP_VALUE if _global_clipping(cfg) else None,
            grad_norm_type=clip.NORM_TYPE,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = make_checkpointer(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model, or the plain model of MODEL.SLIM.INDIVIDUAL_WIDTH when set.

        Either way its ROIAligns get a multi-threaded CPU forward and backward
        (`slim_det.roi_align`; same outputs and gradients, bit for bit;
        `benchmarks/roi_align_backward.py` measures the backward). Slim ROI heads have them
        already; this covers an individual model's stock heads.
        """
        model = build_individual_model(cfg) if individual_width(cfg) else super().build_model(cfg)
        use_parallel_roi_align_(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SOLVER.OPTIMIZER's optimizer (`slim_det.solver`); with CLIP_TYPE "full_model" the
        training step clips instead."""
        if _global_clipping(cfg):
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
        return build_optimizer(cfg, model)

    def build_hooks(self):
        """detectron2's hooks plus a `DivergenceMonitor` that warns about a failing width."""
        hooks = super().build_hooks()
        schedule = self._trainer.schedule
        if isinstance(schedule, FixedWidths):
            labels, prefix = [width_key(w) for w in schedule.widths], "w"
        else:  # the sandwich rule: random widths change every iteration, max and min do not
            labels, prefix = ["max", "min"], ""
        settings = self.cfg.MODEL.SLIM.DIVERGENCE
        check_after = settings.CHECK_AFTER
        if check_after < 0:
            check_after = max(2 * self.cfg.SOLVER.WARMUP_ITERS, 2 * settings.WINDOW)
        monitor = DivergenceMonitor(
            labels, window=settings.WINDOW, spike_factor=settings.SPIKE_FACTOR,
            check_after=check_after, prefix=prefix,
        )
        # Before the writers, so a warning appears next to the losses that caused it.
        hooks.insert(-1 if comm.is_main_process() else len(hooks), monitor)
        return hooks

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        """detectron2's train loader, whose shuffled stream starts at iteration ``start_iter``.

        With ``cfg.SEED >= 0`` the shuffle is seeded by it, so a resumed run continues the exact
        stream of the interrupted one (random augmentations in loader workers are re-seeded).
        """
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if start_iter:
                logging.getLogger(__name__).warning(
                    f"{cfg.DATALOADER.SAMPLER_TRAIN} restarts its stream on resume."
                )
            return super().build_train_loader(cfg)
        kwargs = _train_loader_from_config(cfg)
        kwargs["sampler"] = _ContinuedTrainingSampler(
            len(kwargs["dataset"]),
            start=start_iter * cfg.SOLVER.IMS_PER_BATCH,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
        )
        return build_detection_train_loader(**kwargs)

    def resume_or_load(self, resume=True):
        """As in `DefaultTrainer`; a resumed run also continues the data stream.

        Loads what fits, as detectron2 does (fine-tuning from ImageNet or another task's weights
        is legitimate), and logs one line: tensors loaded, missing, of another shape, unused.
        """
        super().resume_or_load(resume=resume)
        loaded = getattr(self.checkpointer, "last_load", None)
        if loaded is not None:
            logging.getLogger(__name__).info(loaded.line())
        prepare_loaded_norms(self.cfg, self.model, fresh_start=self.start_iter == 0)
        if self.start_iter > 0:
            self._trainer.reset_data_loader(
                lambda: self.build_train_loader(self.cfg, self.start_iter)
            )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluators detectron2's ``tools/train_net.py`` builds for the dataset's
        ``evaluator_type`` (`slim_det.engine.evaluators.build_evaluator`): COCO (box, and mask /
        keypoints when predicted, with the config's OKS sigmas), semantic, panoptic, combined."""
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def width_costs(cls, cfg, model, image_size, widths):
        """Parameters and GFLOPs of ``model`` at each width, independent of what it detects.

        The heads are counted on the config's maximum ROI counts: MODEL.RPN.POST_NMS_TOPK_TEST
        proposals and TEST.DETECTIONS_PER_IMAGE detections (see `detector_costs`). A width whose
        costs cannot be counted gets ``{"note": why}`` instead: costs never lose an evaluation.
        """
        model = _unwrap(model)
        costs = {}
        for width in widths:
            with using_width(model, width):
                try:
                    costs[width] = detector_costs(
                        model, image_size, cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                        cfg.TEST.DETECTIONS_PER_IMAGE,
                    )
                except Exception as error:  # noqa: BLE001  (a cost must never lose an evaluation)
                    # e.g. a meta-architecture with layers the fixed-count forward does not know
                    why = f"costs not counted: {type(error).__name__}: {error}"
                    logging.getLogger(__name__).warning(f"Width {width:g}: {why}")
                    costs[width] = {"note": why[:120]}
        return costs

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` at every width of MODEL.SLIM.TEST_WIDTHS on each test dataset.

        Returns:
            OrderedDict: ``{"w0.5": {"bbox": {...}, "segm": {...}, "cost": {...}}, ...}`` (with
            "sem_seg", "panoptic_seg", ... as the dataset's evaluators report them; nested under
            the dataset name when there are several), so metrics are logged as ``w0.5/bbox/AP``,
            ``w0.5/panoptic_seg/PQ``. The main process also prints a table per dataset (a row per
            width, a column per task metric) and writes it to
            ``OUTPUT_DIR/<dataset>/width_table.{md,json}`` with ``ap_vs_gflops.png``.
        """
        if evaluators is not None:
            raise ValueError("SlimTrainer.test builds one evaluator per width; pass None.")
        setup_slim_logger(cfg.OUTPUT_DIR)
        logger = logging.getLogger(__name__)
        widths = test_widths(cfg)
        calibrate_for_evaluation(cfg, model, widths)
        results = OrderedDict()
        for dataset_name in cfg.DATASETS.TEST:
            data_loader = cls.build_test_loader(cfg, dataset_name)
            per_width = {
                w: cls.build_evaluator(cfg, dataset_name, os.path.join(
                    cfg.OUTPUT_DIR, "inference", dataset_name, f"w{width_key(w)}"))
                for w in widths
            }
            metrics, latency = inference_all_widths(model, data_loader, per_width)
            dataset_results = OrderedDict()
            if comm.is_main_process():
                image_size = _padded_size(_unwrap(model), next(iter(data_loader)))
                costs = cls.width_costs(cfg, model, image_size, widths)
                rows = width_rows(metrics, costs, latency)
                for row in rows:
                    width = row["width"]
                    logger.info(f"Evaluation results for {dataset_name} at width {width:g}:")
                    print_csv_format(metrics[width])
                    dataset_results[f"w{width_key(width)}"] = dict(
                        metrics[width],
                        cost={k: row[k] for k in
                              ("gflops", "backbone_gflops", "params_m", "latency_ms")},
                    )
                caption = cost_caption(image_size, cfg, model)
                logger.info(f"Per-width results on {dataset_name}:\n"
                            + format_width_table(rows) + "\n" + caption)
                save_width_report(rows, os.path.join(cfg.OUTPUT_DIR, dataset_name), caption)
            results[dataset_name] = dataset_results
        if len(results) == 1:
            results = list(results.values())[0]
        return results
