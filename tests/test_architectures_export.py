"""Exporting one width of RetinaNet, Cascade Mask R-CNN and Panoptic FPN (both scopes).

The exported plain model computes exactly what the slim model computes at that width (boxes,
scores, masks, semantic logits, panoptic segments), reloads with `load_exported`, and uses only
stock detectron2 keys wherever they express the channels: everything but Panoptic FPN's
semantic head under scope "all" (its GroupNorms keep the slim layer's channels per group).
"""
import os
import random
import sys
import textwrap

import pytest
import torch
from detectron2.export import TracingAdapter

import slim_det
from slim_det.channels import channel_groups, save_channels, set_channels
from slim_det.export import (
    _inference_without_postprocess,
    _instances,
    export_channels,
    export_onnx,
    export_torchscript,
    export_width,
    load_exported,
    max_output_difference,
    save_exported,
)
from slim_det.inputs import InputError
from slim_det.width import SlimModule
from tests.helpers import REPO, calibrate_bn_, fast_cpu, images  # noqa: F401  (fast_cpu: autouse)
from tests.test_architectures import ARCHITECTURES, WIDTHS, _assert_same_outputs, _build, _cfg
from tests.test_export import run_python

STOCK_NAMES = {"retinanet": ("RetinaNet", "build_retinanet_resnet_fpn_backbone"),
               "cascade": ("GeneralizedRCNN", "build_resnet_fpn_backbone"),
               "panoptic": ("PanopticFPN", "build_resnet_fpn_backbone")}
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]


def _slim(arch, scope, opts=()):
    cfg = _cfg(arch, scope=scope)
    cfg.merge_from_list(list(opts))
    return cfg, calibrate_bn_(_build(cfg), images(1, 96), WIDTHS)


def _outputs(model, width=None):
    with torch.no_grad():
        if width is None:
            return model.eval()(images(1, 96))
        with slim_det.using_width(model, width):
            return model(images(1, 96))


def _assert_plain(plain):
    assert not any(isinstance(m, SlimModule) for m in plain.modules())


@pytest.mark.parametrize("scope", ["backbone", "all"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_equals_the_slim_model_and_reloads(arch, scope, tmp_path):
    cfg, slim = _slim(arch, scope)
    plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
    _assert_plain(plain)
    expected = _outputs(slim, 0.5)
    _assert_same_outputs(expected, _outputs(plain))
    if arch == "panoptic" and scope == "all":
        assert kind == "fixed_channel"
        assert plain_cfg.MODEL.SEM_SEG_HEAD.NAME == "build_fixed_channel_sem_seg_head"
    else:
        assert kind == "stock"
        assert (plain_cfg.MODEL.META_ARCHITECTURE, plain_cfg.MODEL.BACKBONE.NAME) == \
            STOCK_NAMES[arch]
        assert "SLIM" not in plain_cfg.MODEL
    save_exported(plain_cfg, plain, str(tmp_path))
    _, loaded = load_exported(str(tmp_path))
    _assert_same_outputs(expected, _outputs(loaded))


def test_stock_exports_load_without_slim_det(tmp_path):
    """One fresh process loads every stock export with detectron2 alone."""
    expected = {}
    for arch, scope in [("retinanet", "all"), ("cascade", "all"), ("panoptic", "backbone")]:
        cfg, slim = _slim(arch, scope)
        plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
        assert kind == "stock"
        save_exported(plain_cfg, plain, str(tmp_path / arch))
        expected[arch] = _outputs(slim, 0.5)
    torch.save(images(1, 96), tmp_path / "inputs.pth")
    script = textwrap.dedent(f"""
        import sys, torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        outputs = {{}}
        for arch in {sorted(expected)!r}:
            cfg = get_cfg()
            cfg.merge_from_file({str(tmp_path)!r} + "/" + arch + "/config.yaml")
            model = build_model(cfg).eval()
            DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
            with torch.no_grad():
                outputs[arch] = model(torch.load({str(tmp_path / "inputs.pth")!r}))
        torch.save(outputs, {str(tmp_path / "outputs.pth")!r})
        assert "slim_det" not in sys.modules, "the stock load imported slim_det"
    """)
    run_python(script, cwd=str(tmp_path))
    outputs = torch.load(tmp_path / "outputs.pth", weights_only=False)
    for arch, value in expected.items():
        _assert_same_outputs(value, outputs[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_traced_export_matches_eager(arch, tmp_path):
    """--format torchscript / onnx: the traced plain model of each architecture, saved and loaded,
    gives the eager model's un-postprocessed outputs (Panoptic FPN: instances and semantic
    logits)."""
    # Every score kept: a random model's scores are below the default thresholds, and a
    # comparison of empty outputs proves nothing.
    cfg, slim = _slim(arch, "all", ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
                                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    _, plain, _ = export_width(slim, cfg, 0.5)
    if arch == "retinanet":  # its initial scores all equal the prior: ties that NMS may order
        torch.nn.init.normal_(plain.head.cls_score.weight, std=1.0)  # either way
    image = images(1, 96)[0]["image"]
    path = str(tmp_path / "model.ts")
    assert export_torchscript(plain.eval(), image, path) < 1e-4
    adapter = TracingAdapter(plain, [{"image": image}], _inference_without_postprocess)
    with torch.no_grad():
        flat_expected = adapter(image)  # the eager run sets the schema
        expected = adapter.outputs_schema(flat_expected)
        outputs = adapter.outputs_schema(torch.jit.load(path)(image))
    assert len(_instances(expected[0])) > 0
    assert max_output_difference(outputs, expected) < 1e-4
    # ONNX Runtime's kernels round differently: semantic logits are checked relative to their
    # magnitude (export_onnx's own check).
    assert export_onnx(plain, image, str(tmp_path / "model.onnx")) < 1e-3


def test_traced_export_refuses_other_meta_architectures():
    cfg = _cfg("panoptic", scope="backbone")
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    model = _build(cfg).eval()
    with pytest.raises(InputError, match="supports GeneralizedRCNN .* this model is a "
                       "SemanticSegmentor"):
        export_torchscript(model, images(1, 96)[0]["image"], "unused.ts")


def test_panoptic_semantic_head_without_group_norm_exports_to_stock_keys():
    cfg, slim = _slim("panoptic", "all", ["MODEL.SEM_SEG_HEAD.NORM", ""])
    plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
    assert kind == "stock" and plain_cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 64
    _assert_same_outputs(_outputs(slim, 0.5), _outputs(plain))


@pytest.mark.parametrize("arch", ["retinanet", "panoptic"])
def test_fixed_channel_backbone_with_scope_all(arch, tmp_path):
    """ResNet-18 has no stock narrow form: the backbone (and semantic head) freeze from the slim
    ones, the meta-architecture and the other heads are stock."""
    cfg, slim = _slim(arch, "all", R18)
    plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
    assert kind == "fixed_channel"
    assert plain_cfg.MODEL.BACKBONE.NAME == "build_fixed_channel_backbone"
    assert plain_cfg.MODEL.META_ARCHITECTURE == STOCK_NAMES[arch][0]
    _assert_plain(plain)
    save_exported(plain_cfg, plain, str(tmp_path))
    _, loaded = load_exported(str(tmp_path))
    _assert_same_outputs(_outputs(slim, 0.5), _outputs(loaded))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_channel_configuration_export_equals_the_slim_model(arch, tmp_path):
    cfg, slim = _slim(arch, "all")
    rng = random.Random(0)
    config = set_channels(slim, {g.name: rng.choice(g.allowed) for g in channel_groups(slim)})
    # Two images: RetinaNet's P7 is 1 x 1, and a batch norm needs two values per channel.
    slim_det.calibrate_norms(slim, [images(2, 96)], [config], 2)
    path = str(tmp_path / "channels.json")
    save_channels(config, path)
    plain_cfg, plain = export_channels(slim, cfg, config, path)
    _assert_plain(plain)
    expected = _outputs(slim)
    save_exported(plain_cfg, plain, str(tmp_path / "export"))
    _, loaded = load_exported(str(tmp_path / "export"))
    got = _outputs(loaded)
    if "sem_seg" in expected[0]:
        torch.testing.assert_close(got[0]["sem_seg"], expected[0]["sem_seg"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[0]["instances"].scores, expected[0]["instances"].scores,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch, key, message", [
    ("retinanet", "MODEL.RETINANET.NORM",
     r"Cannot export 'head.cls_subnet.1' at width 0.5: a slimmed GroupNorm .*32 groups.*"
     r"Train with MODEL.RETINANET.NORM '' \(no norm\)"),
    ("cascade", "MODEL.ROI_BOX_HEAD.NORM",
     r"Cannot export 'roi_heads.box_head.0.conv1.norm' .*Train with MODEL.ROI_BOX_HEAD.NORM ''"),
])
def test_group_norm_in_a_stock_head_is_refused_by_name(arch, key, message):
    opts = [key, "GN"] + (["MODEL.ROI_BOX_HEAD.NUM_CONV", 1] if arch == "cascade" else [])
    cfg, slim = _slim(arch, "all", opts)
    with pytest.raises(ValueError, match=message):
        export_width(slim, cfg, 0.5)
    export_width(slim, cfg, 1.0)  # full width: the stock GN is the slim one


TOOL_TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.WIDTH_PER_GROUP", 16,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 128,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 20,
    "MODEL.SLIM.DIVISOR", 4, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 96,
]


@pytest.mark.parametrize("config, kind", [("slim_retinanet_all.yaml", "stock"),
                                          ("slim_cascade_mask_rcnn_all.yaml", "stock"),
                                          ("slim_panoptic_fpn_all.yaml", "fixed_channel")])
def test_export_tool(config, kind, tmp_path):
    """tools/export_width.py on the shipped COCO configs (shrunk, random weights)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import export_width as tool

    summary = tool.main(tool.parse_args([
        "--config-file", os.path.join(REPO, "configs", config), "--width", "0.5",
        "--output", str(tmp_path), *[str(v) for v in TOOL_TINY]]))
    assert summary["kind"] == kind
    assert summary["max_difference_vs_slim"]["outputs"] < 1e-4
    _, loaded = load_exported(str(tmp_path))
    _assert_plain(loaded)
