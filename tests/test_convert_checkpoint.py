"""Tests for tools/convert_checkpoint.py: every source format converts losslessly, per width.

The authors' checkpoints are faked with their documented key names and shapes and random values;
the reference for each width is a plain functional re-implementation of the authors' network at
that width (weight slices, that width's own norm). torchvision sources are checked against
torchvision's own models at width 1.0.
"""
import importlib.util
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model

import slim_det
from slim_det.checkpoint_convert import CheckpointFormatError, convert_checkpoint
from slim_det.modeling.mobilenet import build_mobilenet_classifier
from slim_det.width import make_divisible

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOBILE_WIDTHS = {1: [0.25, 0.5, 0.75, 1.0], 2: [0.35, 0.5, 0.75, 1.0]}
RESNET_WIDTHS = [0.25, 0.5, 0.75, 1.0]
STAGES = ["res2", "res3", "res4", "res5"]
# The authors' MobileNet block settings: v1 (c, n, s), v2 (t, c, n, s).
V1_SETTING = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]
V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]
# Authors' feature index that ends each detectron2 stage.
MOBILE_STAGE_ENDS = {1: {3: "res2", 5: "res3", 11: "res4", 13: "res5"},
                     2: {3: "res2", 6: "res3", 13: "res4", 18: "res5"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores shared with other jobs: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Fake:
    """Writes random tensors with given names and shapes into an ordered state dict."""

    def __init__(self, seed):
        self.state = OrderedDict()
        self.gen = torch.Generator().manual_seed(seed)

    def conv(self, name, out, inp, k):
        std = math.sqrt(1.0 / (inp * k * k))  # keeps activations O(1) through deep stacks
        self.state[name + ".weight"] = torch.randn(out, inp, k, k, generator=self.gen) * std

    def norm(self, name, n):
        self.state[name + ".weight"] = torch.rand(n, generator=self.gen) + 0.5
        self.state[name + ".bias"] = torch.randn(n, generator=self.gen) * 0.1
        self.state[name + ".running_mean"] = torch.randn(n, generator=self.gen) * 0.1
        self.state[name + ".running_var"] = torch.rand(n, generator=self.gen) + 0.5
        self.state[name + ".num_batches_tracked"] = torch.tensor(7)

    def switchable(self, name, channels):
        for i, n in enumerate(channels):
            self.norm(f"{name}.bn.{i}", n)

    def linear(self, name, out, inp):
        self.state[name + ".weight"] = torch.randn(out, inp, generator=self.gen) / math.sqrt(inp)
        self.state[name + ".bias"] = torch.randn(out, generator=self.gen) * 0.1


def _authors_mobilenet(version, widths):
    """A fake S-MobileNet state dict in the authors' names (channel lists per width)."""
    fake = _Fake(version)
    rounded = lambda c: [make_divisible(c * w, 8) for w in widths]  # noqa: E731
    channels = rounded(32)
    fake.conv("features.0.0", channels[-1], 3, 3)
    fake.switchable("features.0.1", channels)
    k = 0
    setting = [(1,) + s for s in V1_SETTING] if version == 1 else V2_SETTING
    for t, c, n, _ in setting:
        outp = rounded(c)
        for _ in range(n):
            k += 1
            hidden = [i * t for i in channels]
            body = 0
            if version == 2 and t != 1:
                fake.conv(f"features.{k}.body.0", hidden[-1], channels[-1], 1)
                fake.switchable(f"features.{k}.body.1", hidden)
                body = 3
            fake.conv(f"features.{k}.body.{body}", hidden[-1], 1, 3)  # depthwise
            fake.switchable(f"features.{k}.body.{body + 1}", hidden)
            fake.conv(f"features.{k}.body.{body + 3}", outp[-1], hidden[-1], 1)
            fake.switchable(f"features.{k}.body.{body + 4}", outp)
            channels = outp
    if version == 2:
        fake.conv(f"features.{k + 1}.0", 1280, channels[-1], 1)
        fake.norm(f"features.{k + 1}.1", 1280)
    fake.linear("classifier.0", 1000, 1280 if version == 2 else channels[-1])
    return fake.state


def _bn(x, state, name):
    return F.batch_norm(x, state[name + ".running_mean"], state[name + ".running_var"],
                        state[name + ".weight"], state[name + ".bias"], False, 0.0, 1e-5)


def _conv(x, state, name, out, stride=1, depthwise=False):
    weight = state[name + ".weight"]
    k = weight.shape[-1]
    groups = x.shape[1] if depthwise else 1
    return F.conv2d(x, weight[:out, : x.shape[1] // groups], None, stride, k // 2, 1, groups)


def _authors_mobilenet_forward(state, version, widths, width, x):
    """The authors' S-MobileNet at one width: stage outputs and logits."""
    i = widths.index(width)
    rounded = lambda c: make_divisible(c * width, 8)  # noqa: E731
    cbr = lambda x, conv, bn, out, s=1, dw=False, act=True: (  # noqa: E731
        (F.relu6 if act else (lambda y: y))(_bn(_conv(x, state, conv, out, s, dw), state, bn))
    )
    x = cbr(x, "features.0.0", "features.0.1.bn.%d" % i, rounded(32), 2)
    outputs, k = {}, 0
    setting = [(1,) + s for s in V1_SETTING] if version == 1 else V2_SETTING
    for t, c, n, s in setting:
        for j in range(n):
            k += 1
            f, stride, inp = f"features.{k}.body", s if j == 0 else 1, x
            body = 0
            if version == 2 and t != 1:
                x = cbr(x, f"{f}.0", f"{f}.1.bn.{i}", x.shape[1] * t)
                body = 3
            x = cbr(x, f"{f}.{body}", f"{f}.{body + 1}.bn.{i}", x.shape[1], stride, dw=True)
            x = cbr(x, f"{f}.{body + 3}", f"{f}.{body + 4}.bn.{i}", rounded(c), act=(version == 1))
            if version == 2 and stride == 1 and inp.shape[1] == x.shape[1]:
                x = x + inp
            if k in MOBILE_STAGE_ENDS[version]:
                outputs[MOBILE_STAGE_ENDS[version][k]] = x
    if version == 2:
        x = cbr(x, f"features.{k + 1}.0", f"features.{k + 1}.1", 1280)
        outputs["res5"] = x
    weight = state["classifier.0.weight"][:, : x.shape[1]]
    return outputs, F.linear(x.mean(dim=(2, 3)), weight, state["classifier.0.bias"])


def _authors_resnet50(widths):
    """A fake S-ResNet-50 state dict in the authors' names (int(c * w) channels)."""
    fake = _Fake(50)
    channels = [int(64 * w) for w in widths]
    fake.conv("features.0.0", channels[-1], 3, 7)
    fake.switchable("features.0.1", channels)
    k = 0
    for stage, n in enumerate([3, 4, 6, 3]):
        outp = [int(64 * 2 ** stage * w * 4) for w in widths]
        mid = [c // 4 for c in outp]
        for b in range(n):
            k += 1
            f = f"features.{k}"
            fake.conv(f"{f}.body.0", mid[-1], channels[-1], 1)
            fake.switchable(f"{f}.body.1", mid)
            fake.conv(f"{f}.body.3", mid[-1], mid[-1], 3)
            fake.switchable(f"{f}.body.4", mid)
            fake.conv(f"{f}.body.6", outp[-1], mid[-1], 1)
            fake.switchable(f"{f}.body.7", outp)
            if b == 0:
                fake.conv(f"{f}.shortcut.0", outp[-1], channels[-1], 1)
                fake.switchable(f"{f}.shortcut.1", outp)
            channels = outp
    fake.linear("classifier.0", 1000, channels[-1])
    return fake.state


def _authors_resnet50_forward(state, widths, width, x):
    """The authors' S-ResNet-50 at one width: stage outputs."""
    i = widths.index(width)
    x = F.relu(_bn(_conv(x, state, "features.0.0", int(64 * width), 2), state,
                   f"features.0.1.bn.{i}"))
    x = F.max_pool2d(x, 3, 2, 1)
    outputs, k = {}, 0
    for stage, n in enumerate([3, 4, 6, 3]):
        outp = int(64 * 2 ** stage * width * 4)
        for b in range(n):
            k += 1
            f, stride = f"features.{k}", 2 if b == 0 and stage > 0 else 1
            y = F.relu(_bn(_conv(x, state, f"{f}.body.0", outp // 4), state, f"{f}.body.1.bn.{i}"))
            y = _conv(y, state, f"{f}.body.3", outp // 4, stride)
            y = F.relu(_bn(y, state, f"{f}.body.4.bn.{i}"))
            y = _bn(_conv(y, state, f"{f}.body.6", outp), state, f"{f}.body.7.bn.{i}")
            if b == 0:
                x = _bn(_conv(x, state, f"{f}.shortcut.0", outp, stride), state,
                        f"{f}.shortcut.1.bn.{i}")
            x = F.relu(x + y)
        outputs[STAGES[stage]] = x
    return outputs


def _save(tmp_path, name, state, wrap=True):
    path = str(tmp_path / name)
    data = OrderedDict(("module." + k, v) for k, v in state.items())
    torch.save({"model": data} if wrap else dict(state), path)
    return path


def _convert(source, output, **kwargs):
    lines = []
    checkpoint = convert_checkpoint(source, output, log=lines.append, **kwargs)
    return checkpoint, "\n".join(lines)


def _cfg(config=None, **overrides):
    cfg = slim_det.add_slim_config(get_cfg())
    if config:
        cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def _slim_trunk(name, widths, **overrides):
    cfg = _cfg(**{"MODEL.SLIM.WIDTHS": widths, "MODEL.BACKBONE.FREEZE_AT": 0, **overrides})
    return BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3)).eval()


def _load(model, path):
    DetectionCheckpointer(model).load(path)
    return model.eval()


def _assert_close(actual, expected):
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def mobilenet_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mobilenet")
    files = {}
    for version in (1, 2):
        state = _authors_mobilenet(version, MOBILE_WIDTHS[version])
        files[version] = (state, _save(tmp, f"s_mobilenet_v{version}.pt", state))
    return files


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    state = _authors_resnet50(RESNET_WIDTHS)
    return state, _save(tmp_path_factory.mktemp("resnet"), "s_resnet50.pt", state, wrap=False)


@pytest.mark.parametrize("version", [1, 2])
def test_authors_mobilenet_every_width(version, mobilenet_files, tmp_path):
    state, source = mobilenet_files[version]
    widths = MOBILE_WIDTHS[version]
    output = str(tmp_path / "converted.pth")
    checkpoint, printed = _convert(source, output)
    assert checkpoint["slim_det_source"]["format"] == f"s_mobilenet_v{version}"
    assert checkpoint["slim_det_input_format"]["INPUT.FORMAT"] == "RGB"
    assert "features.0.1.bn.0 -> stem.conv1.norm.private.w0_" in printed
    assert f'NAME: "build_slim_mobilenet_v{version}_fpn_backbone"' in printed
    trunk = _load(_slim_trunk(f"build_slim_mobilenet_v{version}_backbone", widths,
                              **{"MODEL.MOBILENET.NORM": "BN"}), output)
    classifier = _load(build_mobilenet_classifier(version, widths), output)
    x = torch.rand(2, 3, 64, 64)
    for width in widths:
        expected, logits = _authors_mobilenet_forward(state, version, widths, width, x)
        slim_det.set_width(trunk, width)
        slim_det.set_width(classifier, width)
        with torch.no_grad():
            actual = trunk(x)
            _assert_close(classifier(x), logits)
        for stage in STAGES:
            _assert_close(actual[stage], expected[stage])


def test_authors_resnet_every_width(resnet_file, tmp_path):
    state, source = resnet_file
    output = str(tmp_path / "converted.pth")
    checkpoint, printed = _convert(source, output)
    assert checkpoint["slim_det_source"] == {"file": "s_resnet50.pt", "format": "s_resnet",
                                             "depth": 50, "widths": RESNET_WIDTHS}
    assert checkpoint["slim_det_input_format"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert "features.1.shortcut.1.bn.3 -> res2.0.shortcut.norm (width 1)" in printed
    trunk = _load(_slim_trunk("build_slim_resnet_backbone", RESNET_WIDTHS, **{
        "MODEL.RESNETS.NORM": "BN", "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.OUT_FEATURES": STAGES}), output)
    x = torch.rand(1, 3, 64, 64)
    for width in RESNET_WIDTHS:
        expected = _authors_resnet50_forward(state, RESNET_WIDTHS, width, x)
        slim_det.set_width(trunk, width)
        with torch.no_grad():
            actual = trunk(x)
        for stage in STAGES:
            _assert_close(actual[stage], expected[stage])


def _randomized(model):
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=gen) + 0.5
            module.bias.data = torch.randn(n, generator=gen) * 0.1
            module.running_mean.data = torch.randn(n, generator=gen) * 0.1
            module.running_var.data = torch.rand(n, generator=gen) + 0.5
    return model.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet(depth, tmp_path):
    reference = _randomized(getattr(torchvision.models, f"resnet{depth}")())
    source = str(tmp_path / "tv.pth")
    torch.save(reference.state_dict(), source)
    output = str(tmp_path / "converted.pth")
    checkpoint, printed = _convert(source, output, widths=[0.5, 1.0])
    assert checkpoint["slim_det_config"]["MODEL.RESNETS.DEPTH"] == depth
    assert "layer1.0.conv1 -> res2.0.conv1" in printed and "fc -> linear" in printed
    overrides = {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.NORM": "BN",
                 "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.OUT_FEATURES": STAGES}
    if depth < 50:
        overrides["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    trunk = _load(_slim_trunk("build_slim_resnet_backbone", [0.5, 1.0], **overrides), output)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        actual = trunk(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for stage, layer in zip(STAGES, ["layer1", "layer2", "layer3", "layer4"]):
            y = getattr(reference, layer)(y)
            _assert_close(actual[stage], y)
    # One torchvision norm serves every width: narrower private norms are its slices.
    private = trunk.res3[0].conv1.norm.private["w0_5"]
    torch.testing.assert_close(private.running_var, reference.layer2[0].bn1.running_var[:64])


def test_torchvision_mobilenet_v2(tmp_path):
    reference = _randomized(torchvision.models.mobilenet_v2())
    source = str(tmp_path / "tv.pth")
    torch.save(reference.state_dict(), source)
    output = str(tmp_path / "converted.pth")
    checkpoint, printed = _convert(source, output)
    assert checkpoint["slim_det_source"]["format"] == "torchvision_mobilenet_v2"
    assert "features.18.0 -> res5.conv_last" in printed
    widths = MOBILE_WIDTHS[2]
    trunk = _load(_slim_trunk("build_slim_mobilenet_v2_backbone", widths,
                              **{"MODEL.MOBILENET.NORM": "BN"}), output)
    classifier = _load(build_mobilenet_classifier(2, widths), output)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        actual = trunk(x)
        y = x
        for stage, (start, end) in zip(STAGES, [(0, 4), (4, 7), (7, 14), (14, 19)]):
            y = reference.features[start:end](y)
            _assert_close(actual[stage], y)
        _assert_close(classifier(x), reference(x))
        slim_det.set_width(trunk, 0.35)
        assert trunk(x)["res2"].shape[1] == 8


@pytest.mark.parametrize("kind", ["mobilenet_v2", "resnet50"])
def test_detection_checkpointer_fills_faster_rcnn_backbone(kind, mobilenet_files, resnet_file,
                                                           tmp_path):
    if kind == "resnet50":
        (_, source), config = resnet_file, "slim_faster_rcnn.yaml"
    else:
        (_, source), config = mobilenet_files[2], "slim_mobilenet_v2_faster_rcnn.yaml"
    output = str(tmp_path / "converted.pth")
    checkpoint, _ = _convert(source, output, cfg=_cfg(config))
    model = build_model(_cfg(config))
    DetectionCheckpointer(model).load(output)
    loaded = model.backbone.bottom_up.state_dict()
    converted = checkpoint["model"]
    for key, value in converted.items():
        if key.startswith(("classifier.", "linear.")) or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[key], value), key
    for key, value in loaded.items():
        if key in converted or key.endswith("num_batches_tracked"):
            continue
        # Only a norm the authors shared across widths (v2's last) is derived from the full one.
        assert key.startswith("res5.conv_last.norm.private."), key
        full = converted["res5.conv_last.norm." + key.rsplit(".", 1)[-1]]
        assert torch.equal(value, full), key
    assert sum(".private." in k for k in converted) > 100  # the authors' per-width norms


def test_bad_files(tmp_path):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointFormatError, match="missing.pt: no such checkpoint file"):
        _convert(missing, str(tmp_path / "out.pth"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="garbage.pt: cannot be read"):
        _convert(str(garbage), str(tmp_path / "out.pth"))
    unknown = _save(tmp_path, "unknown.pt", {"encoder.weight": torch.zeros(3)})
    with pytest.raises(CheckpointFormatError, match="unknown.pt: not a recognized checkpoint"):
        _convert(unknown, str(tmp_path / "out.pth"))
    assert not os.path.exists(tmp_path / "out.pth")


def test_incomplete_or_extra_keys(mobilenet_files, tmp_path):
    state, _ = mobilenet_files[1]
    truncated = OrderedDict(state)
    del truncated["features.7.body.3.weight"]
    path = _save(tmp_path, "truncated.pt", truncated)
    with pytest.raises(CheckpointFormatError, match=r"lacks 'features\.7\.body\.3\.weight'"):
        _convert(path, str(tmp_path / "out.pth"))
    extra = OrderedDict(state)
    extra["features.0.1.bn.4.weight"] = torch.ones(32)
    path = _save(tmp_path, "extra.pt", extra)
    with pytest.raises(CheckpointFormatError, match="holds 5 norm copies"):
        _convert(path, str(tmp_path / "out.pth"), widths=[0.25, 0.5, 0.75, 1.0])


def test_width_mismatches(mobilenet_files, tmp_path):
    _, source = mobilenet_files[2]
    out = str(tmp_path / "out.pth")
    with pytest.raises(CheckpointFormatError, match=r"holds 4 norm copies .* has 2 widths"):
        _convert(source, out, widths=[0.5, 1.0])
    with pytest.raises(CheckpointFormatError, match=r"do not have the channels of widths "
                                                    r"\[0\.25, 0\.5, 0\.75, 1\.0\]"):
        _convert(source, out, widths=[0.25, 0.5, 0.75, 1.0])
    two_widths = _cfg("slim_mobilenet_v2_faster_rcnn.yaml", **{"MODEL.SLIM.WIDTHS": [0.5, 1.0]})
    with pytest.raises(CheckpointFormatError, match="differ from the config's MODEL.SLIM.WIDTHS"):
        _convert(source, out, widths=[0.35, 0.5, 0.75, 1.0], cfg=two_widths)
    with pytest.raises(CheckpointFormatError, match="the checkpoint is a mobilenet_v2"):
        _convert(source, out, cfg=_cfg("slim_mobilenet_v1_faster_rcnn.yaml",
                                       **{"MODEL.SLIM.WIDTHS": MOBILE_WIDTHS[2]}))
    assert not os.path.exists(out)


def test_cli(mobilenet_files, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint_cli", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    _, source = mobilenet_files[1]
    out = str(tmp_path / "v1.pth")
    config = os.path.join(REPO, "configs", "slim_mobilenet_v1_mask_rcnn.yaml")
    assert cli.main([source, out, "--config-file", config]) == 0
    printed = capsys.readouterr().out
    assert "PIXEL_STD: [58.395, 57.12, 57.375]" in printed and os.path.exists(out)
    assert cli.main([source, out, "--widths", "0.35", "0.5", "0.75", "1.0"]) == 2
    assert "convert_checkpoint: error:" in capsys.readouterr().err
