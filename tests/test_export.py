"""Exporting one width: the plain model computes what the slim model computes at that width."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

import slim_det
from slim_det.export import (
    export_onnx,
    export_torchscript,
    export_width,
    exported_config,
    load_exported,
    max_output_difference,
    save_exported,
)
from slim_det.width import SlimModule
from tests.helpers import fast_cpu  # noqa: F401  (autouse: one thread, no oneDNN)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = [0.25, 0.5, 0.75, 1.0]
# Channel counts divisible by 8 at 0.25 and 0.5, so both widths are expressible with stock keys.
TINY = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.STEM_OUT_CHANNELS", 32,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 128, "MODEL.RESNETS.WIDTH_PER_GROUP", 32,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 30,
    "TEST.DETECTIONS_PER_IMAGE", 10,
]


def run_python(code_or_script, *args, cwd=None):
    """Run python code (or a script with arguments) in a fresh process, without oneDNN."""
    prelude = "import torch; torch.backends.mkldnn.enabled = False; torch.set_num_threads(1)\n"
    if args:
        code = prelude + f"import runpy, sys; sys.argv = {[code_or_script, *args]!r}\n"
        code += f"runpy.run_path({code_or_script!r}, run_name='__main__')"
    else:
        code = prelude + code_or_script
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, timeout=300,
                   stdout=subprocess.DEVNULL)


def tiny_model(config="slim_mask_rcnn_all.yaml", opts=()):
    """A tiny slim Mask R-CNN whose BNs have statistics at every width."""
    torch.manual_seed(0)
    cfg = slim_det.add_slim_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(TINY + list(opts))
    cfg.freeze()
    model = build_model(cfg)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.momentum = None
    images = torch.rand(2, 3, 96, 96) * 4 - 2
    model.train()
    with torch.no_grad():
        for width in WIDTHS:
            slim_det.set_width(model, width)
            model.backbone(images)
    slim_det.set_width(model, 1.0)
    return cfg, model.eval()


def image():
    return torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(1)) * 255


def assert_same_outputs(slim, plain, width):
    inputs = [{"image": image()}]
    with torch.no_grad(), slim_det.using_width(slim, width):
        expected = slim(inputs)
    with torch.no_grad():
        outputs = plain(inputs)
    assert len(expected[0]["instances"]) > 0
    assert {"pred_boxes", "scores", "pred_masks"} <= set(expected[0]["instances"].get_fields())
    assert max_output_difference(outputs, expected) < 1e-4


def assert_plain(model, slim):
    assert not any(isinstance(m, SlimModule) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in slim.parameters())


@pytest.fixture(scope="module")
def r50_all():
    return tiny_model()


@pytest.mark.parametrize("width", [0.5, 0.25])
def test_resnet_export_equals_slim_model(r50_all, width):
    cfg, slim = r50_all
    plain_cfg, plain, kind = export_width(slim, cfg, width)
    assert kind == "stock"
    assert plain_cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert plain_cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == int(128 * width)
    assert "SLIM" not in plain_cfg.MODEL
    assert_plain(plain, slim)
    assert_same_outputs(slim, plain.eval(), width)


def test_plain_models_pool_with_parallel_roi_align(r50_all, tmp_path):
    from detectron2.layers import ROIAlign

    from slim_det.roi_align import ParallelROIAlign

    cfg, slim = r50_all
    plain_cfg, plain, _ = export_width(slim, cfg, 0.5)
    save_exported(plain_cfg, plain, str(tmp_path))
    _, loaded = load_exported(str(tmp_path))
    for model in (plain, loaded):
        poolers = [m for m in model.modules() if isinstance(m, ROIAlign)]
        assert poolers and all(type(m) is ParallelROIAlign for m in poolers)


def test_scope_backbone_keeps_fpn_and_heads_full():
    cfg, slim = tiny_model("slim_mask_rcnn.yaml")
    plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
    assert kind == "stock" and plain_cfg.MODEL.FPN.OUT_CHANNELS == 32
    assert_same_outputs(slim, plain.eval(), 0.5)


def test_stock_load_without_slim_det(r50_all, tmp_path):
    cfg, slim = r50_all
    plain_cfg, plain, _ = export_width(slim, cfg, 0.5)
    config, _ = save_exported(plain_cfg, plain, str(tmp_path / "export"))
    torch.save([{"image": image()}], tmp_path / "inputs.pth")
    script = textwrap.dedent(f"""
        import sys, torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        cfg = get_cfg()
        cfg.merge_from_file({config!r})
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "inputs.pth")!r}))[0]["instances"]
        torch.save({{k: getattr(v, "tensor", v) for k, v in out.get_fields().items()}},
                   {str(tmp_path / "outputs.pth")!r})
        assert "slim_det" not in sys.modules, "the stock load imported slim_det"
    """)
    run_python(script, cwd=str(tmp_path))
    fields = torch.load(tmp_path / "outputs.pth")
    with torch.no_grad(), slim_det.using_width(slim, 0.5):
        expected = slim([{"image": image()}])[0]["instances"]
    assert len(expected) == len(fields["scores"]) > 0
    torch.testing.assert_close(fields["pred_boxes"], expected.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(fields["scores"], expected.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(fields["pred_masks"], expected.pred_masks)


R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
MOBILENET_V2 = [
    "MODEL.BACKBONE.NAME", "build_slim_mobilenet_v2_fpn_backbone", "MODEL.MOBILENET.NORM", "BN"
]


@pytest.mark.parametrize("opts", [R18, MOBILENET_V2], ids=["r18", "mobilenet_v2"])
def test_fixed_channel_export(opts, tmp_path):
    cfg, slim = tiny_model(opts=opts)
    plain_cfg, plain, kind = export_width(slim, cfg, 0.5)
    assert kind == "fixed_channel"
    assert plain_cfg.MODEL.BACKBONE.NAME == "build_fixed_channel_backbone"
    assert plain_cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    assert_plain(plain, slim)
    assert_same_outputs(slim, plain.eval(), 0.5)
    save_exported(plain_cfg, plain, str(tmp_path))
    _, loaded = load_exported(str(tmp_path))
    assert_same_outputs(slim, loaded, 0.5)


@pytest.mark.parametrize("opts", [[], R18], ids=["r50_stock", "r18_fixed_channel"])
def test_fpn_min_width_exports_the_wider_fpn(opts):
    # FPN with BN: its private norm at 0.25 must have the floor's channels, not the width's.
    floor = ["MODEL.SLIM.FPN_MIN_WIDTH", 0.5, "MODEL.FPN.NORM", "BN"]
    cfg, slim = tiny_model(opts=floor + opts)
    plain_cfg, plain, kind = export_width(slim, cfg, 0.25)
    assert kind == ("stock" if not opts else "fixed_channel")
    assert plain.backbone.output_shape()["p2"].channels == 16  # 32 FPN channels at 0.5
    assert plain_cfg.MODEL.ROI_BOX_HEAD.FC_DIM == 16  # the heads still follow the width
    assert_same_outputs(slim, plain.eval(), 0.25)


def calibrate_(model, widths):
    """Calibrate ``widths`` of ``model`` on two random images (slim_det.calibrate_norms)."""
    batches = [[{"image": torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(i)) * 255}]
               for i in range(2)]
    slim_det.calibrate_norms(model, batches, widths, num_images=2)


def test_untrained_width_is_refused_until_calibrated():
    cfg, slim = tiny_model()
    with pytest.raises(ValueError, match="Width 0.3 has no batch-norm statistics.*Calibrate it"):
        exported_config(slim, cfg, 0.3)
    calibrate_(slim, [0.3])
    plain_cfg, plain, _ = export_width(slim, cfg, 0.3)
    assert_same_outputs(slim, plain.eval(), 0.3)


UNIVERSAL = ["MODEL.SLIM.MODE", "universal", "MODEL.SLIM.WIDTH_RANGE", [0.25, 1.0],
             "MODEL.SLIM.WIDTHS", [0.25, 0.5, 1.0], "MODEL.SLIM.CALIBRATE_INIT_IMAGES", 0]


@pytest.mark.parametrize("opts", [[], R18], ids=["r50_stock", "r18_fixed_channel"])
def test_universal_model_exports_any_calibrated_width(opts):
    cfg, slim = tiny_model(opts=UNIVERSAL + opts)
    with pytest.raises(ValueError, match=r"Width 0.1 is outside MODEL.SLIM.WIDTH_RANGE \[0.25, 1\]"):
        exported_config(slim, cfg, 0.1)
    with pytest.raises(ValueError, match="Width 0.6 has no batch-norm statistics"):
        exported_config(slim, cfg, 0.6)
    calibrate_(slim, [0.6, 1.0])
    for width in (0.6, 1.0):  # 1.0 too: a universal model's width 1.0 runs calibrated statistics
        plain_cfg, plain, kind = export_width(slim, cfg, width)
        assert plain_cfg.MODEL.get("SLIM", {}).get("MODE", "switchable") == "switchable"
        if width < 1:
            assert_plain(plain, slim)
        assert_same_outputs(slim, plain.eval(), width)


def test_torchscript_matches_eager(r50_all, tmp_path):
    cfg, slim = r50_all
    _, plain, _ = export_width(slim, cfg, 0.5)
    plain.eval()
    path = str(tmp_path / "model.ts")
    assert export_torchscript(plain, image(), path) < 1e-4
    # An eager run of an adapter gives the schema that turns the flat outputs into Instances.
    adapter = TracingAdapter(
        plain, [{"image": image()}], lambda m, inputs: m.inference(inputs, do_postprocess=False)
    )
    with torch.no_grad():
        flat_expected = adapter(image())  # sets adapter.outputs_schema
        expected = adapter.outputs_schema(flat_expected)
        outputs = adapter.outputs_schema(torch.jit.load(path)(image()))
    assert len(expected[0]) > 0
    assert max_output_difference(outputs, expected) < 1e-4


def test_onnx_matches_eager(r50_all, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    cfg, slim = r50_all
    _, plain, _ = export_width(slim, cfg, 0.5)
    assert export_onnx(plain.eval(), image(), str(tmp_path / "model.onnx")) < 1e-3


def test_export_tool_calibrates_a_universal_width(tmp_path):
    # A random universal model, never calibrated: the tool calibrates width 0.4 on the tiny
    # shapes training images, exports it and checks the export against the slim model.
    from tests.engine_helpers import shapes_cfg

    cfg = shapes_cfg("universal_mask", tmp_path, **{"TEST.CALIBRATION_IMAGES": 4})
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "universal.pth")
    overrides = [str(v) for v in (
        "MODEL.WEIGHTS", tmp_path / "universal.pth", "TEST.CALIBRATION_IMAGES", 4,
        "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "('shapes_tiny_val',)",
        "DATALOADER.NUM_WORKERS", 0)]
    tiny = [str(v) for kv in _flat(cfg, TINY_KEYS) for v in kv]
    run_python(
        os.path.join(REPO, "tools", "export_width.py"),
        "--config-file", os.path.join(REPO, "configs", "shapes", "slim_universal_mask_rcnn_shapes.yaml"),
        "--width", "0.4", "--output", str(tmp_path / "w0.4"), *tiny, *overrides,
    )
    _, exported = load_exported(str(tmp_path / "w0.4"))
    assert not any(isinstance(m, SlimModule) for m in exported.modules())


# The keys configs/tests/tiny.yaml changes in a shapes config, passed to a tool on its command line.
TINY_KEYS = ("MODEL.FPN.OUT_CHANNELS", "MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_MASK_HEAD.CONV_DIM",
             "MODEL.SLIM.DIVISOR", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "TEST.DETECTIONS_PER_IMAGE", "SOLVER.IMS_PER_BATCH")


def _flat(cfg, keys):
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = value[part]
        yield key, value


def test_export_tool(tmp_path):
    run_python(
        os.path.join(REPO, "tools", "export_width.py"),
        "--config-file", os.path.join(REPO, "configs", "slim_mask_rcnn_all.yaml"),
        "--width", "0.5", "--output", str(tmp_path), "--format", "torchscript",
        *[str(v) for v in TINY], "INPUT.MIN_SIZE_TEST", "128",
    )
    for name in ("config.yaml", "model_final.pth", "model.ts"):
        assert os.path.isfile(tmp_path / name)
