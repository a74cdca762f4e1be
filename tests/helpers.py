"""Small configs and utilities shared by the tests."""
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import slim_det

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

STOCK_ZOO = {
    "faster": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "mask": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "keypoint": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
}


def slim_cfg(task="mask", scope="backbone", tiny=True, norm="BN", widths=(0.25, 0.5, 0.75, 1.0)):
    """A slim R-CNN config on CPU; ``tiny`` shrinks every dimension for speed."""
    cfg = get_cfg()
    slim_det.add_slim_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, f"slim_{task}_rcnn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SLIM.SCOPE = scope
    cfg.MODEL.SLIM.WIDTHS = list(widths)
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    if tiny:
        shrink_(cfg)
    return cfg


def shrink_(cfg):
    """Shrink a R50-FPN R-CNN config to a fast test model (same structure, fewer channels)."""
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (32, 32)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1 if cfg.MODEL.KEYPOINT_ON else 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.SLIM.DIVISOR = 4
    return cfg


def stock_cfg(task="mask", norm="BN"):
    """detectron2's model-zoo R50-FPN config for ``task``, with BN and no weights, on CPU."""
    cfg = slim_det.add_slim_config(get_cfg())  # stock builders ignore MODEL.SLIM
    cfg.merge_from_file(model_zoo.get_config_file(STOCK_ZOO[task]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


@pytest.fixture(scope="module", autouse=True)
def fast_cpu():
    """Import into a test module to run it on one thread without oneDNN: oneDNN builds kernels on
    the first call of every conv shape (most of a tiny model's run time), and tiny ops gain
    nothing from more threads but lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.backends.mkldnn.flags(enabled=False):
        yield
    torch.set_num_threads(threads)


def images(n=1, size=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, size, size, generator=gen) * 255} for _ in range(n)]


@torch.no_grad()
def calibrate_bn_(model, inputs, widths=(1.0,)):
    """Give every BN (and private BN) real statistics: random weights + default stats explode.

    Sets cumulative averaging, runs the backbone in train mode at each width, then eval mode.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.backbone.train()
    batch = model.preprocess_image(inputs).tensor
    for width in widths:
        if slim_det.width.is_slimmable(model):
            slim_det.set_width(model, width)
        model.backbone(batch)
    if slim_det.width.is_slimmable(model):
        slim_det.set_width(model, 1.0)
    model.eval()
    return model


def build(cfg):
    return build_model(cfg).eval()


def to_slim_(cfg, scope="backbone"):
    """Switch a stock R-FPN config to slim_det's builders, changing nothing else."""
    cfg.MODEL.BACKBONE.NAME = "build_slim_resnet_fpn_backbone"
    cfg.MODEL.RPN.HEAD_NAME = "SlimRPNHead"
    cfg.MODEL.ROI_HEADS.NAME = "SlimStandardROIHeads"
    cfg.MODEL.SLIM.SCOPE = scope
    return cfg
