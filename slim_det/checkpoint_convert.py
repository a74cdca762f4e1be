"""Turn ImageNet checkpoints into slim_det initial weights (``MODEL.WEIGHTS``).

Sources:

- the S-Nets authors' slimmable S-ResNet, S-MobileNet v1 and S-MobileNet v2: keys prefixed
  ``module.``, switchable norms ``...bn.{i}.*`` with ``i`` indexing the width list in ascending
  order and each copy holding its own width's channels. Each copy goes to *its width by name*:
  the full width to the stock names (``norm.weight``), width 0.25 to ``norm.private.w0_25.*``, etc.
- torchvision's ResNet-18/34/50/101/152 and MobileNet v2: one norm per layer. slim_det derives every
  narrower width's private norm from it (sliced) when loading, so only names change.

The output is a detectron2 checkpoint with backbone-trunk names (``stem.conv1.weight``,
``res2.0.conv1.norm.weight``) and ``matching_heuristics``, so `DetectionCheckpointer` maps it into
``backbone.bottom_up.*`` by suffix. Every converted tensor is checked, name and shape, against a
slim trunk built with the requested widths, so an unknown file or wrong width list is refused.
"""
import os
import re
from collections import OrderedDict

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from .config import add_slim_config
from .layers import private_norm_name
from .modeling.backbone import build_slim_resnet_backbone
from .modeling.mobilenet import V1_LAYOUT, V2_LAYOUT, build_mobilenet_classifier

__all__ = [
    "FORMATS",
    "CheckpointFormatError",
    "read_state_dict",
    "detect_format",
    "convert_state_dict",
    "convert_checkpoint",
]

FORMATS = OrderedDict(
    s_resnet="the S-Nets authors' S-ResNet (features.N.body.M, shortcut, switchable bn.{i})",
    s_mobilenet_v1="the S-Nets authors' S-MobileNet v1 (features.N.body.M, switchable bn.{i})",
    s_mobilenet_v2="the S-Nets authors' S-MobileNet v2 (features.N.body.M, switchable bn.{i})",
    torchvision_resnet="torchvision's ResNet (conv1, bn1, layerX.Y.convZ, downsample, fc)",
    torchvision_mobilenet_v2="torchvision's MobileNet v2 (features.N.conv.M, classifier.1)",
)
# The width lists of the authors' released ImageNet models.
RELEASED_WIDTHS = {
    "s_resnet": [0.25, 0.5, 0.75, 1.0],
    "s_mobilenet_v1": [0.25, 0.5, 0.75, 1.0],
    "s_mobilenet_v2": [0.35, 0.5, 0.75, 1.0],
}
# Every source here was trained on RGB images normalized with torchvision's ImageNet statistics,
# and every ResNet among them strides in the 3x3 conv (pytorch style).
INPUT_FORMAT = OrderedDict(
    [
        ("INPUT.FORMAT", "RGB"),
        ("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]),
        ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375]),
    ]
)
RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
BACKBONES = {
    "resnet": ("build_slim_resnet_fpn_backbone", "build_slim_resnet_backbone"),
    "mobilenet_v1": ("build_slim_mobilenet_v1_fpn_backbone", "build_slim_mobilenet_v1_backbone"),
    "mobilenet_v2": ("build_slim_mobilenet_v2_fpn_backbone", "build_slim_mobilenet_v2_backbone"),
}
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be converted, or a width list that does not fit it."""


def read_state_dict(path, trust_pickle=False):
    """Load a checkpoint's state dict: ``{'model': sd}``, ``{'state_dict': sd}`` or a bare ``sd``.

    Args:
        trust_pickle (bool): allow arbitrary pickled objects (``torch.load(weights_only=False)``);
            only for files from a trusted source.

    Returns:
        OrderedDict[str, Tensor]: the state dict without DataParallel's ``module.`` prefix.
    """
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such checkpoint file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointFormatError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). If it is "
            "a trusted file holding more than tensors, pass --trust-pickle."
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise CheckpointFormatError(
            f"{path}: expected a state dict of tensors (bare or under 'model' / 'state_dict')."
        )
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v)
                       for k, v in obj.items())


def detect_format(state, path="<state dict>"):
    """The format of a state dict, one of `FORMATS`, from its key names."""
    if "features.0.1.bn.0.weight" in state and "features.1.body.0.weight" in state:
        if "features.1.shortcut.0.weight" in state:
            return "s_resnet"
        return "s_mobilenet_v2" if "features.2.body.6.weight" in state else "s_mobilenet_v1"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "torchvision_resnet"
    if "features.1.conv.0.0.weight" in state and "features.18.0.weight" in state:
        return "torchvision_mobilenet_v2"
    sample = ", ".join(list(state)[:4])
    raise CheckpointFormatError(
        f"{path}: not a recognized checkpoint (keys start {sample} ...). Expected one of: "
        + "; ".join(FORMATS.values())
        + "."
    )


def _resnet_plan(state, fmt, path):
    """[(source prefix, slim_det prefix, kind)] for both ResNet namings, and the depth."""
    authors = fmt == "s_resnet"
    plan = [("features.0.0" if authors else "conv1", "stem.conv1", "param")]
    plan.append(("features.0.1" if authors else "bn1", "stem.conv1.norm", "norm"))
    if authors:
        # Blocks are numbered across stages; a projection shortcut starts a new stage.
        blocks, k = [], 1
        while f"features.{k}.body.0.weight" in state:
            if f"features.{k}.shortcut.0.weight" in state or not blocks:
                blocks.append([])
            blocks[-1].append(f"features.{k}")
            k += 1
        bottleneck = True
        parts = {"conv1": "body.0", "conv2": "body.3", "conv3": "body.6", "shortcut": "shortcut.0"}
        norms = {"conv1": "body.1", "conv2": "body.4", "conv3": "body.7", "shortcut": "shortcut.1"}
    else:
        blocks = []
        for layer in range(1, 5):
            names = []
            while f"layer{layer}.{len(names)}.conv1.weight" in state:
                names.append(f"layer{layer}.{len(names)}")
            blocks.append(names)
        bottleneck = "layer1.0.conv3.weight" in state
        parts = {f"conv{i}": f"conv{i}" for i in (1, 2, 3)}
        parts["shortcut"] = "downsample.0"
        norms = {f"conv{i}": f"bn{i}" for i in (1, 2, 3)}
        norms["shortcut"] = "downsample.1"
    depth = RESNET_DEPTHS.get((tuple(len(b) for b in blocks), bottleneck))
    if depth is None:
        raise CheckpointFormatError(
            f"{path}: a {FORMATS[fmt]} checkpoint with blocks per stage "
            f"{[len(b) for b in blocks]} ({'bottleneck' if bottleneck else 'basic'}) matches no "
            "ResNet depth; expected 18, 34, 50, 101 or 152."
        )
    for stage, names in enumerate(blocks, start=2):
        for b, src in enumerate(names):
            for part in ("conv1", "conv2", "conv3", "shortcut"):
                if f"{src}.{parts[part]}.weight" in state:
                    plan.append((f"{src}.{parts[part]}", f"res{stage}.{b}.{part}", "param"))
                    plan.append((f"{src}.{norms[part]}", f"res{stage}.{b}.{part}.norm", "norm"))
    plan.append(("classifier.0" if authors else "fc", "linear", "param"))
    return plan, depth


def _mobilenet_plan(fmt):
    """[(source prefix, slim_det prefix, kind)] for the MobileNets."""
    v2 = fmt != "s_mobilenet_v1"
    authors = fmt.startswith("s_")
    plan = [("features.0.0", "stem.conv1", "param"), ("features.0.1", "stem.conv1.norm", "norm")]
    layout = V2_LAYOUT if v2 else V1_LAYOUT
    k = 0
    for stage, blocks in layout.items():
        for i, (expansion, _, _) in enumerate(blocks):
            k += 1
            dst = "stem.block" if stage == "stem" else f"{stage}.{i}"
            parts = ["depthwise", "project"] if v2 else ["depthwise", "pointwise"]
            if expansion != 1:
                parts.insert(0, "expand")
            for j, part in enumerate(parts):
                if authors:  # body = [conv, bn, relu] * n
                    conv, norm = f"features.{k}.body.{3 * j}", f"features.{k}.body.{3 * j + 1}"
                elif part == "project":  # torchvision: ConvNormActivation(s), then conv, bn
                    conv, norm = f"features.{k}.conv.{j}", f"features.{k}.conv.{j + 1}"
                else:
                    conv, norm = f"features.{k}.conv.{j}.0", f"features.{k}.conv.{j}.1"
                plan += [(conv, f"{dst}.{part}", "param"), (norm, f"{dst}.{part}.norm", "norm")]
    if v2:  # the last 1x1 conv; the authors gave it one plain norm shared by every width
        plan += [(f"features.{k + 1}.0", "res5.conv_last", "param")]
        plan += [(f"features.{k + 1}.1", "res5.conv_last.norm", "plain_norm")]
    plan.append(("classifier.0" if authors else "classifier.1", "classifier", "param"))
    return plan


def _apply_plan(state, plan, fmt, widths, path):
    """Rename by ``plan``; switchable norms go to their widths' names.

    Returns:
        tuple: (renamed state, {slim_det key: source key}, printable mapping lines).
    """
    switchable = fmt.startswith("s_")
    out, origins, lines = OrderedDict(), {}, []

    def take(src, dst, required=True):
        if src not in state:
            if required:
                raise CheckpointFormatError(
                    f"{path}: this {FORMATS[fmt]} checkpoint lacks '{src}' (for slim_det's "
                    f"'{dst}')."
                )
            return
        out[dst], origins[dst] = state[src], src

    for src, dst, kind in plan:
        if kind == "param":
            take(f"{src}.weight", f"{dst}.weight")
            take(f"{src}.bias", f"{dst}.bias", required=False)
            lines.append(f"{src} -> {dst}")
        elif kind == "plain_norm" or not switchable:
            for key in _NORM_KEYS:
                take(f"{src}.{key}", f"{dst}.{key}", required=key != "num_batches_tracked")
            lines.append(f"{src} -> {dst}" + (" (every width)" if switchable else ""))
        else:
            for i, width in enumerate(widths):
                target = dst if width >= 1.0 else f"{dst}.private.{private_norm_name(width)}"
                for key in _NORM_KEYS:
                    take(f"{src}.bn.{i}.{key}", f"{target}.{key}", key != "num_batches_tracked")
                lines.append(f"{src}.bn.{i} -> {target} (width {width:g})")
    used = set(origins.values())
    unused = [k for k in state if k not in used]
    if unused:
        raise CheckpointFormatError(
            f"{path}: {len(unused)} keys of this {FORMATS[fmt]} checkpoint have no place in "
            f"slim_det's network, e.g. {unused[:4]}. Is it a different architecture"
            + (" or trained for more widths?" if switchable else "?")
        )
    return out, origins, lines


def _reference_state(family, depth, widths, divisor):
    """Names and shapes of a slim trunk (plus its classifier) built with ``widths``."""
    if family == "resnet":
        cfg = add_slim_config(get_cfg())
        cfg.MODEL.RESNETS.DEPTH = depth
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.BACKBONE.FREEZE_AT = 0  # only names and shapes matter; freezing changes neither
        cfg.MODEL.SLIM.WIDTHS, cfg.MODEL.SLIM.DIVISOR = list(widths), divisor
        trunk = build_slim_resnet_backbone(cfg, ShapeSpec(channels=3))
        shapes = {k: v.shape for k, v in trunk.state_dict().items()}
        channels = trunk.output_shape()["res5"].channels
        return shapes, "linear", channels
    model = build_mobilenet_classifier(int(family[-1]), widths, divisor)
    shapes = {k.replace("trunk.", "", 1): v.shape for k, v in model.state_dict().items()}
    return shapes, "classifier", model.classifier.in_features


def _check_against_trunk(out, origins, fmt, family, depth, widths, divisor, path):
    shapes, classifier, channels = _reference_state(family, depth, widths, divisor)
    for dst, value in out.items():
        if dst.startswith(classifier + "."):
            if dst.endswith(".weight") and (value.dim() != 2 or value.shape[1] != channels):
                raise CheckpointFormatError(
                    f"{path}: classifier '{origins[dst]}' has shape {tuple(value.shape)}; "
                    f"expected (classes, {channels})."
                )
            continue
        if dst not in shapes:
            raise CheckpointFormatError(f"{path}: '{origins[dst]}' maps to '{dst}', which "
                                        f"slim_det's {family} has not.")
        if value.shape != shapes[dst]:
            hint = ""
            if ".private." in dst or (fmt.startswith("s_") and ".bn." in origins[dst]):
                hint = (f" The checkpoint's norm copies do not have the channels of widths "
                        f"{widths} (make_divisible(c*w, {divisor})); pass the widths it was "
                        "trained for with --widths.")
            raise CheckpointFormatError(
                f"{path}: '{origins[dst]}' has shape {tuple(value.shape)} but slim_det's '{dst}' "
                f"needs {tuple(shapes[dst])}.{hint}"
            )
    missing = [k for k in shapes if k not in out and ".private." not in k
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointFormatError(
            f"{path}: this {FORMATS[fmt]} checkpoint has nothing for slim_det's {missing[:4]} "
            f"({len(missing)} tensors in all)."
        )


def _resolve_widths(state, fmt, widths, config_widths, path):
    if not fmt.startswith("s_"):
        return None  # a single norm per layer fits every width list
    # The stem's norm tells how many widths the checkpoint was trained for.
    copies = sum(1 for k in state if re.fullmatch(r"features\.0\.1\.bn\.\d+\.weight", k))
    if widths is None:
        widths = config_widths
    if widths is None:
        widths = RELEASED_WIDTHS[fmt] if copies == len(RELEASED_WIDTHS[fmt]) else None
    if widths is None:
        raise CheckpointFormatError(
            f"{path}: holds {copies} norm copies per layer (bn.0..bn.{copies - 1}); pass the "
            "widths it was trained for, ascending, with --widths."
        )
    widths = sorted(float(w) for w in widths)
    if config_widths is not None and widths != sorted(float(w) for w in config_widths):
        raise CheckpointFormatError(
            f"{path}: --widths {widths} differ from the config's MODEL.SLIM.WIDTHS "
            f"{list(config_widths)}; the model must be built with the checkpoint's widths."
        )
    if len(widths) != copies:
        raise CheckpointFormatError(
            f"{path}: holds {copies} norm copies per layer (bn.0..bn.{copies - 1}) but the width "
            f"list {widths} has {len(widths)} widths."
        )
    if widths[-1] != 1.0 or len(set(widths)) != len(widths) or widths[0] <= 0:
        raise CheckpointFormatError(f"Widths must be distinct, in (0, 1], the largest 1.0; got "
                                    f"{widths}.")
    return widths


def convert_state_dict(state, fmt=None, widths=None, config_widths=None, divisor=8,
                       path="<state dict>"):
    """Convert a source state dict into slim_det trunk names.

    Args:
        state (dict[str, Tensor]): the source state dict (``module.`` prefix already removed).
        fmt (str or None): one of `FORMATS`; detected from the keys when None.
        widths (list[float] or None): the authors' width list (ascending); defaults to the
            config's widths, then to the released models' lists.
        config_widths (list[float] or None): MODEL.SLIM.WIDTHS of the config the weights are for.
        divisor (int): MODEL.SLIM.DIVISOR.
        path (str): the file name, for messages.

    Returns:
        tuple: (state dict in slim_det names, info dict with "format", "family", "depth",
        "widths" and "mapping" (printable "source -> slim_det" lines)).
    """
    fmt = fmt or detect_format(state, path)
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"Unknown format {fmt!r}; expected one of {list(FORMATS)}.")
    widths = _resolve_widths(state, fmt, widths, config_widths, path)
    if fmt.endswith("resnet"):
        family, (plan, depth) = "resnet", _resnet_plan(state, fmt, path)
    else:
        family, depth, plan = "mobilenet_" + fmt[-2:], None, _mobilenet_plan(fmt)
    out, origins, lines = _apply_plan(state, plan, fmt, widths or [1.0], path)
    _check_against_trunk(out, origins, fmt, family, depth, widths or [1.0], divisor, path)
    out = OrderedDict((k, v.detach().clone().contiguous()) for k, v in out.items())
    info = {"format": fmt, "family": family, "depth": depth, "widths": widths, "mapping": lines}
    return out, info


def recommended_config(info, output_path):
    """The config values the converted weights imply, as {"MODEL.X": value}."""
    config = OrderedDict([("MODEL.WEIGHTS", output_path),
                          ("MODEL.BACKBONE.NAME", BACKBONES[info["family"]][0])])
    config.update(INPUT_FORMAT)
    if info["family"] == "resnet":
        config["MODEL.RESNETS.DEPTH"] = info["depth"]
        config["MODEL.RESNETS.STRIDE_IN_1X1"] = False
        if info["depth"] < 50:  # detectron2 requires it for basic blocks; its default is 256
            config["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    if info["widths"] is not None:
        config["MODEL.SLIM.WIDTHS"] = info["widths"]
    return config


def _check_config(cfg, config, info, log):
    for key, value in config.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if key == "MODEL.WEIGHTS":
            continue
        if key == "MODEL.BACKBONE.NAME":
            if node not in BACKBONES[info["family"]]:
                raise CheckpointFormatError(
                    f"The config builds MODEL.BACKBONE.NAME {node!r}, but the checkpoint is a "
                    f"{info['family']}; use one of {BACKBONES[info['family']]}."
                )
        elif key == "MODEL.RESNETS.DEPTH" and node != value:
            raise CheckpointFormatError(f"The config has MODEL.RESNETS.DEPTH {node}, the "
                                        f"checkpoint is a ResNet-{value}.")
        elif (list(node) if isinstance(node, (list, tuple)) else node) != value:
            log(f"WARNING: the config has {key} = {node!r}; these weights expect {value!r}.")


def _yaml_lines(config):
    lines, opened = [], []
    # Keys sharing a parent must be adjacent, or YAML would see a section twice.
    for key, value in sorted(config.items(), key=lambda item: item[0].split(".")[:-1]):
        parts = key.split(".")
        common = 0
        while common < min(len(opened), len(parts) - 1) and opened[common] == parts[common]:
            common += 1
        for depth, part in enumerate(parts[common:-1], start=common):
            lines.append("  " * depth + part + ":")
        opened = parts[:-1]
        text = f'"{value}"' if isinstance(value, str) else str(value)
        lines.append("  " * (len(parts) - 1) + f"{parts[-1]}: {text}")
    return lines


def convert_checkpoint(source, output, fmt=None, widths=None, cfg=None, divisor=None,
                       trust_pickle=False, log=print):
    """Convert the checkpoint file ``source`` and save slim_det initial weights to ``output``.

    Args:
        fmt (str or None): one of `FORMATS`, or None to detect it.
        widths (list[float] or None): see `convert_state_dict`.
        cfg (CfgNode or None): the config the weights are for (with slim_det's keys); its
            MODEL.SLIM.WIDTHS, backbone and depth must fit the checkpoint.
        divisor (int or None): channel divisor; defaults to the config's, else 8.
        log (callable): where the mapping and the config lines are printed.

    Returns:
        dict: the saved checkpoint.
    """
    state = read_state_dict(source, trust_pickle)
    config_widths = list(cfg.MODEL.SLIM.WIDTHS) if cfg is not None else None
    if divisor is None:
        divisor = cfg.MODEL.SLIM.DIVISOR if cfg is not None else 8
    model, info = convert_state_dict(state, fmt, widths, config_widths, divisor, source)
    log(f"{source}: {FORMATS[info['format']]}" +
        (f", widths {info['widths']}" if info["widths"] else ""))
    if widths is not None and info["widths"] is None:
        log("Note: the widths are not used; this checkpoint has one norm per layer, from which "
            "slim_det derives every width's norm when loading.")
    for line in info["mapping"]:
        log("  " + line)
    config = recommended_config(info, output)
    if cfg is not None:
        _check_config(cfg, config, info, log)
    checkpoint = {
        "model": model,
        "__author__": "slim_det.convert_checkpoint",
        "matching_heuristics": True,
        "slim_det_source": {"file": os.path.basename(source), "format": info["format"],
                            "depth": info["depth"], "widths": info["widths"]},
        "slim_det_input_format": {k: v for k, v in config.items()
                                  if k in INPUT_FORMAT or k.endswith("STRIDE_IN_1X1")},
        "slim_det_config": dict(config),
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(checkpoint, output)
    log(f"Saved {len(model)} tensors to {output}. Config lines for these weights:")
    for line in _yaml_lines(config):
        log("  " + line)
    return checkpoint
