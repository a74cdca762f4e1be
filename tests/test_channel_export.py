"""A searched channel configuration: export as a plain model, load, retrain (MODEL.SLIM.INDIVIDUAL_CHANNELS)."""
import os
import random
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

import slim_det
from slim_det.channels import channel_groups, save_channels, set_channels
from slim_det.export import export_channels, load_exported, max_output_difference, save_exported
from slim_det.width import SlimModule
from tests.engine_helpers import read_metrics, shapes_cfg, train
from tests.helpers import REPO, build, calibrate_bn_, images, slim_cfg


def _random_config(model, seed):
    rng = random.Random(seed)
    return {g.name: rng.choice(g.allowed) for g in channel_groups(model)}


def test_export_equals_the_supernet_and_reloads(tmp_path):
    cfg = slim_cfg("mask", "all")
    model = calibrate_bn_(build(cfg), images(1, 96), widths=(0.25, 0.5, 0.75, 1.0))
    config = set_channels(model, _random_config(model, 3))
    inputs = images(2, 96)
    with pytest.raises(ValueError, match="has no batch-norm statistics in this model"):
        export_channels(model, cfg, config, str(tmp_path / "channels.json"))
    slim_det.calibrate_norms(model, [inputs], [config], 2)
    save_channels(config, str(tmp_path / "channels.json"))
    plain_cfg, plain = export_channels(model, cfg, config, str(tmp_path / "channels.json"))
    assert not any(isinstance(m, SlimModule) for m in plain.modules())
    assert plain_cfg.MODEL.SLIM.INDIVIDUAL_CHANNELS == str(tmp_path / "channels.json")
    with torch.no_grad():
        expected = model(inputs)
        assert max_output_difference(expected, plain.eval()(inputs)) < 1e-4
    save_exported(plain_cfg, plain, str(tmp_path / "export"))
    _, loaded = load_exported(str(tmp_path / "export"))
    with torch.no_grad():
        assert max_output_difference(expected, loaded(inputs)) < 1e-4


def test_tools_export_then_train_net_retrains_and_fine_tunes(tmp_path):
    """tools/export_width.py --channels, then the exported config through SlimTrainer: from scratch
    (a few steps, evaluated) and fine-tuned from the supernet's own checkpoint (tensors sliced)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import export_width

    cfg = shapes_cfg("mask", output_dir=tmp_path / "supernet", **{"SOLVER.MAX_ITER": 3})
    supernet = train(cfg)
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    groups = channel_groups(supernet.model)
    config_file = tmp_path / "searched.json"
    save_channels({g.name: g.allowed[len(g.allowed) // 2] for g in groups}, str(config_file))
    slim_file = tmp_path / "slim.yaml"
    slim_file.write_text(cfg.dump())
    summary = export_width.main(export_width.parse_args([
        "--config-file", str(slim_file), "--channels", str(config_file),
        "--output", str(tmp_path / "export"), "MODEL.WEIGHTS", weights,
        "TEST.CALIBRATION_IMAGES", "4"]))
    assert summary["max_difference_vs_slim"]["outputs"] < 1e-3
    exported_cfg, plain = load_exported(summary["config"])
    assert sum(p.numel() for p in plain.parameters()) == summary["parameters"]

    for weights_in, name in (("", "scratch"), (weights, "finetune")):
        retrain = exported_cfg.clone()
        retrain.defrost()
        retrain.MODEL.WEIGHTS = weights_in
        retrain.OUTPUT_DIR = str(tmp_path / name)
        retrain.SOLVER.MAX_ITER = 3
        trainer = train(retrain)
        assert not any(isinstance(m, SlimModule) and not hasattr(m, "_fixed_width")
                       for m in trainer.model.modules())
        rows = [r for r in read_metrics(retrain.OUTPUT_DIR) if "w1/bbox/AP" in r]
        assert rows, f"no evaluation of the retrained configuration ({name})"
        saved = DetectionCheckpointer(plain).load(
            os.path.join(retrain.OUTPUT_DIR, "model_final.pth"))
        assert saved is not None
