"""A checkpoint that does not fit the config is refused for evaluation, export, calibration and the
demo (slim_det.weights), training still loads what fits and logs it, and the tools' other bad
inputs (config files, images, output paths) end with one message and exit status 2."""
import logging
import os
import re
import runpy
import sys
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import yaml

from slim_det.config import load_slim_cfg
from slim_det.engine import SlimTrainer
from slim_det.inputs import (
    InputError,
    check_writable_dir,
    check_writable_file,
    merge_config_file,
    read_image_file,
)
from slim_det.weights import IncompatibleCheckpointError, load_weights
from tests.helpers import CONFIGS, REPO, fast_cpu  # noqa: F401  (autouse: one thread)

# The checkpoints every test loads, each saved from a tiny shapes Faster R-CNN built with these
# overrides of the tiny config (R-18, 3 classes, widths 0.25-1).
CHECKPOINTS = {
    "right": [],
    "depth": ["MODEL.RESNETS.DEPTH", 34],
    "classes": ["MODEL.ROI_HEADS.NUM_CLASSES", 5],
    "widths": ["MODEL.SLIM.INDIVIDUAL_WIDTH", 0.5],  # a model of one width, e.g. a baseline
    "other_norms": ["MODEL.SLIM.WIDTHS", [0.5, 1.0]],  # other widths' private norms only
}
# What each wrong checkpoint's error must say, beyond naming it.
CAUSES = {
    "depth": r"another depth: the checkpoint's backbone has 3, 4, 6, 3 basic blocks in res2-res5 "
             r"\(ResNet-34\), the model's 2, 2, 2, 2 basic blocks in res2-res5 \(ResNet-18\)",
    "classes": r"another number of classes: the checkpoint's roi_heads.box_predictor.cls_score "
               r"has 5 classes, the model's 3 \(MODEL.ROI_HEADS.NUM_CLASSES 3\)",
    "widths": r"other widths: the checkpoint's tensors are narrower than the model's \(about 0.5 "
              r"of their channels\)",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(config file, {name: checkpoint path}, folder): the tiny config as one file, checkpoints."""
    root = tmp_path_factory.mktemp("weights")
    with open(os.path.join(CONFIGS, "tests", "tiny.yaml")) as f:
        tiny = yaml.safe_load(f)
    tiny["_BASE_"] = os.path.join(CONFIGS, "shapes", "slim_faster_rcnn_shapes.yaml")
    tiny["DATASETS"] = {"TRAIN": ["shapes_tiny_train"], "TEST": ["shapes_tiny_val"]}
    tiny["OUTPUT_DIR"] = str(root / "out")
    config = root / "tiny_faster.yaml"
    config.write_text(yaml.safe_dump(tiny))
    paths = {}
    for name, opts in CHECKPOINTS.items():
        cfg = load_slim_cfg(str(config), opts)
        torch.manual_seed(0)
        model = SlimTrainer.build_model(cfg)
        paths[name] = str(root / f"{name}.pth")
        torch.save({"model": model.state_dict()}, paths[name])
    return str(config), paths, root


def _model(config, *opts):
    cfg = load_slim_cfg(config, [str(v) for v in opts])
    return cfg, SlimTrainer.build_model(cfg)


def _logger_states():
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in
                                       list(logging.root.manager.loggerDict)]
    return [(logger, list(logger.handlers), logger.propagate, logger.level) for logger in loggers]


def run_tool(name, *args):
    """Run ``python tools/<name> args`` in this process; return its exit status.

    The loggers are restored afterwards: a tool attaches handlers to this test's captured
    streams, which later tests would find closed.
    """
    argv = [os.path.join(REPO, "tools", name)] + [str(a) for a in args]
    states = _logger_states()
    try:
        with mock.patch.object(sys, "argv", argv):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code
    finally:
        for logger, handlers, propagate, level in states:
            logger.handlers[:] = handlers
            logger.propagate, logger.level = propagate, level
    return 0


def _image(path):
    cv2.imwrite(str(path), np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    return str(path)


def _tool_args(tool, config, root, checkpoint):
    """Arguments of a run of ``tool`` that reaches the loading of ``checkpoint``."""
    weights = ["MODEL.WEIGHTS", checkpoint]
    if tool == "train_net.py":
        return ["--config-file", config, "--eval-only", *weights, "OUTPUT_DIR", root / "eval"]
    if tool == "export_width.py":
        return ["--config-file", config, "--width", 0.5, "--output", root / "export", *weights]
    if tool == "calibrate.py":
        return ["--config-file", config, "--widths", 0.5, "--output", root / "cal.pth", *weights]
    return ["--config-file", config, "--input", _image(root / "in.png"), "--output",
            root / "drawn.png", "--width", 1.0, *weights]


@pytest.mark.parametrize("tool", ["train_net.py", "export_width.py", "calibrate.py", "demo.py"])
@pytest.mark.parametrize("wrong", ["depth", "classes", "widths"])
def test_tools_refuse_a_checkpoint_that_does_not_fit(tool, wrong, saved, capsys):
    config, paths, root = saved
    assert run_tool(tool, *_tool_args(tool, config, root, paths[wrong])) == 2
    err = capsys.readouterr().err
    assert f"{tool}: error: Checkpoint {paths[wrong]} does not fit this model: " in err
    assert "tensors did not load" in err and "Traceback" not in err
    assert len(re.findall(CAUSES[wrong], err)) == 1, err
    assert "MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS True" in err
    assert not os.path.exists(root / "cal.pth") and not os.path.exists(root / "drawn.png")


def test_demo_runs_the_right_checkpoint_and_partial_weights_when_allowed(saved, tmp_path):
    config, paths, _ = saved
    args = _tool_args("demo.py", config, tmp_path, paths["right"])
    assert run_tool("demo.py", *args) == 0
    assert os.path.isfile(tmp_path / "drawn.png")
    os.remove(tmp_path / "drawn.png")
    args = _tool_args("demo.py", config, tmp_path, paths["classes"])
    assert run_tool("demo.py", *args, "MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS", True) == 0
    assert os.path.isfile(tmp_path / "drawn.png")


def test_the_right_checkpoint_loads_every_tensor(saved):
    config, paths, _ = saved
    _, model = _model(config)
    summary = load_weights(load_slim_cfg(config), model, paths["right"])
    assert summary.fits and summary.loaded == summary.total == len(model.state_dict())
    assert summary.line() == (f"Loaded {summary.total} of {summary.total} model tensors from "
                              f"{paths['right']}: 0 missing, 0 of another shape, 0 checkpoint "
                              "tensors unused.")


def test_a_shallower_checkpoint_is_missing_blocks(saved):
    # The example the other way round: R-18 weights evaluated as a deeper ResNet.
    config, paths, _ = saved
    cfg, model = _model(config, "MODEL.RESNETS.DEPTH", 34)
    with pytest.raises(IncompatibleCheckpointError) as error:
        load_weights(cfg, model, paths["right"])
    message = str(error.value)
    assert "(0 of another shape)" not in message and "missing from the checkpoint" in message
    assert "backbone.bottom_up.res2.2.conv1.weight: not in the checkpoint, model (64, 64, 3, 3)" \
        in message
    assert "(ResNet-18), the model's 3, 4, 6, 3 basic blocks in res2-res5 (ResNet-34); " \
        "MODEL.RESNETS.DEPTH 34" in message


def test_norms_the_slim_model_derives_are_not_missing(saved, tmp_path):
    config, paths, _ = saved
    cfg = load_slim_cfg(config)
    # A stock checkpoint (no private norms): every width's norm is the full one, sliced.
    state = torch.load(paths["right"])["model"]
    stock = {k: v for k, v in state.items() if ".private." not in k}
    torch.save({"model": stock}, tmp_path / "stock.pth")
    _, model = _model(config)
    summary = load_weights(cfg, model, str(tmp_path / "stock.pth"))
    assert summary.fits and len(summary.derived) == len(state) - len(stock) > 0
    assert summary.loaded == len(stock)
    assert f"({len(summary.derived)} private-norm tensors derived by the slim model)" in \
        summary.line()
    # Private norms of other widths: the configured ones take the sliced affine and get their
    # statistics by calibration before they run (or are refused), as before.
    _, model = _model(config)
    summary = load_weights(cfg, model, paths["other_norms"])
    assert summary.fits and summary.derived and not summary.missing


def test_checkpoint_without_heads_or_masks_is_named(saved, tmp_path):
    config, paths, _ = saved
    state = torch.load(paths["right"])["model"]
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}
    torch.save({"model": backbone}, tmp_path / "imagenet.pth")
    cfg, model = _model(config)
    with pytest.raises(IncompatibleCheckpointError, match=r"holds no weights for backbone FPN, "
                       r"proposal_generator, roi_heads.box_head, roi_heads.box_predictor: "
                       r"backbone-only weights"):
        load_weights(cfg, model, str(tmp_path / "imagenet.pth"))
    cfg, model = _model(config, "MODEL.MASK_ON", True)
    with pytest.raises(IncompatibleCheckpointError, match=r"it has no roi_heads.mask_head: it was "
                       r"trained without masks \(set MODEL.MASK_ON False"):
        load_weights(cfg, model, paths["right"])


def test_partial_weights_opt_out_and_other_loading_errors(saved):
    config, paths, _ = saved
    cfg, model = _model(config, "MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS", True)
    summary = load_weights(cfg, model, paths["classes"])
    assert not summary.fits and len(summary.mismatched) == 4
    assert load_weights(cfg, model, "") is None  # no weights: nothing to check
    cfg.MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS = "yes"  # set in Python (an override must be a bool)
    with pytest.raises(InputError, match="ALLOW_PARTIAL_WEIGHTS must be True or False; got 'yes'"):
        load_weights(cfg, model, paths["right"])
    with pytest.raises(InputError, match=r"Config override rejected \(Type mismatch"):
        _model(config, "MODEL.SLIM.ALLOW_PARTIAL_WEIGHTS", "'yes'")
    cfg, model = _model(config)
    with pytest.raises(InputError, match=r"Checkpoint '/no/such.pth' \(MODEL.WEIGHTS\) is not a "
                       "file"):
        load_weights(cfg, model, "/no/such.pth")
    # Training keeps detectron2's tolerance.
    assert load_weights(cfg, model, paths["classes"], require_fit=False).mismatched


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_training_from_a_stock_backbone_loads_what_fits_and_logs_it(saved, tmp_path):
    config, paths, _ = saved
    state = torch.load(paths["right"])["model"]
    backbone = {k: v for k, v in state.items()
                if k.startswith("backbone.bottom_up.") and ".private." not in k}
    torch.save({"model": backbone}, tmp_path / "imagenet.pth")
    cfg = load_slim_cfg(config, ["MODEL.WEIGHTS", str(tmp_path / "imagenet.pth"), "OUTPUT_DIR",
                                 str(tmp_path), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"])
    trainer = SlimTrainer(cfg)
    logger, lines = logging.getLogger("slim_det.engine.trainer"), _Lines()
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        trainer.resume_or_load(resume=False)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    trainer.train()
    assert trainer.iter == 1  # the one iteration ran
    summary = [line for line in lines.lines if line.startswith("Loaded ")]
    assert summary == [trainer.checkpointer.last_load.line()]
    missing = len(trainer.checkpointer.last_load.missing)
    assert missing > 0 and f": {missing} missing, 0 of another shape, 0 checkpoint tensors " \
        "unused." in summary[0]


def test_bad_config_files_image_and_output_paths_are_named(saved, tmp_path, capsys):
    config, paths, root = saved
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {config}\nMODEL:\n  WEIGHTS: [1, 2\n")
    assert run_tool("export_width.py", "--config-file", bad, "--width", 0.5, "--output",
                    tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"export_width.py: error: --config-file '{bad}' is not valid YAML (line 4, column 1" \
        in err and "Traceback" not in err
    cfg = load_slim_cfg(config)
    (tmp_path / "bad.json").write_text('{"MODEL": {"WEIGHTS": "",}}')
    with pytest.raises(InputError, match=r"'.*bad.json' is not valid JSON \(line 1, column 26"):
        merge_config_file(cfg, str(tmp_path / "bad.json"))
    (tmp_path / "typo.yaml").write_text("MODEL:\n  SLIM:\n    WIDHTS: [0.5, 1.0]\n")
    with pytest.raises(InputError, match="Non-existent config key: MODEL.SLIM.WIDHTS; it is not"):
        merge_config_file(cfg, str(tmp_path / "typo.yaml"))
    (tmp_path / "list.yaml").write_text("- MODEL\n")
    with pytest.raises(InputError, match="must hold a mapping of config keys.*holds a list"):
        merge_config_file(cfg, str(tmp_path / "list.yaml"))
    with pytest.raises(InputError, match=r"config file '/no/such.yaml' is not a file"):
        merge_config_file(cfg, "/no/such.yaml")

    # demo.py: an input that is not an image (PIL's traceback before), outputs it cannot write.
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    common = ["--config-file", config, "--width", 1.0, "MODEL.WEIGHTS", paths["right"]]
    assert run_tool("demo.py", "--input", text, "--output", tmp_path / "o.png", *common) == 2
    err = capsys.readouterr().err
    assert f"demo.py: error: --input '{text}' is not an image PIL can read (cannot identify " \
        "image file); give an image file (JPG, JPEG, PNG" in err and "Traceback" not in err
    image = _image(tmp_path / "in.png")
    assert run_tool("demo.py", "--input", image, "--output", tmp_path / "o.txt", *common) == 2
    assert f"--output '{tmp_path / 'o.txt'}' must end in one of .jpg, .jpeg" in \
        capsys.readouterr().err
    under_file = text / "o.png"
    assert run_tool("demo.py", "--input", image, "--output", under_file, *common) == 2
    assert f"--output '{under_file}' cannot be written: '{text}' is a file, not a folder" in \
        capsys.readouterr().err
    # export_width.py: an output folder that is a file; calibrate.py: a file under a file.
    assert run_tool("export_width.py", "--config-file", config, "--width", 0.5, "--output", text,
                    "MODEL.WEIGHTS", paths["right"]) == 2
    assert f"--output '{text}' is a file; give a folder" in capsys.readouterr().err
    assert run_tool("calibrate.py", "--config-file", config, "--widths", 0.5, "--output",
                    under_file, "MODEL.WEIGHTS", paths["right"]) == 2
    assert "calibrate.py: error: --output" in capsys.readouterr().err
    with pytest.raises(InputError, match="is a folder; give the path of a file"):
        check_writable_file(str(tmp_path))
    assert check_writable_dir(str(tmp_path / "new" / "folder")) == str(tmp_path / "new/folder")
    assert not os.path.exists(tmp_path / "new")  # checking creates nothing
    with pytest.raises(InputError, match=r"--sample-image '.*notes.jpg' is not an image"):
        read_image_file(str(text), "BGR", "--sample-image")
