"""Individually trained baselines (MODEL.SLIM.INDIVIDUAL_WIDTH), the large validation split and
benchmarks/fidelity.py (issue #10)."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import slim_det
from slim_det.analysis import active_parameter_count
from slim_det import config as slim_config
from slim_det.data import ensure_shapes
from slim_det.data.shapes import DEFAULT_SPLITS, LARGE_VAL_SPLITS
from slim_det.engine import SlimTrainer
from slim_det.export import export_width
from slim_det.individual import (
    IndividualCheckpointer,
    build_individual_model,
    individual_config,
    make_checkpointer,
)
from slim_det.layers import SwitchableNorm
from slim_det.width import SlimModule
from tests.engine_helpers import read_metrics, shapes_cfg, train
from tests.helpers import REPO, images, slim_cfg

BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import _fidelity_table  # noqa: E402
import fidelity  # noqa: E402


def _individual(cfg, width):
    cfg = cfg.clone()
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = width
    return cfg


@pytest.mark.parametrize("make_cfg, width, kind", [
    (lambda: shapes_cfg("mask"), 0.5, "fixed_channel"),     # R18: stock keys cannot narrow it
    (lambda: shapes_cfg("mask"), 1.0, "stock"),
    (lambda: slim_cfg("mask", scope="all"), 0.25, "stock"),  # R50: a stock detectron2 model
    (lambda: slim_cfg("keypoint", scope="backbone"), 0.5, "stock"),
])
def test_individual_model_is_the_plain_model_of_its_width(make_cfg, width, kind):
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_individual_model(_individual(cfg, width))
    assert individual_config(_individual(cfg, width))[1] == kind
    # No slimmable layer or private norm: only the parameter-free width tag.
    assert [type(m).__name__ for m in model.modules() if isinstance(m, SlimModule)] == [
        "IndividualWidth"]
    assert not any(isinstance(m, SwitchableNorm) for m in model.modules())
    # Same tensors, by name and shape, as the exported plain model of that width.
    slim = build_model(cfg).eval()
    _, plain, _ = export_width(slim, cfg, width)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()}
    with slim_det.using_width(slim, width):
        used = active_parameter_count(slim, images(1, 64))
    assert sum(p.numel() for p in model.parameters()) == used
    assert slim_det.get_width(model) == width


def _normalised_std(convs, fan):
    """Std of all weights, each divided by its layer's init std 1/sqrt(fan) (gain left in)."""
    values = torch.cat([(c.weight.detach() * math.sqrt(fan(c))).flatten() for c in convs])
    return values.std().item()


def test_fixed_channel_backbone_starts_from_detectron2_init_at_its_own_shape():
    torch.manual_seed(0)
    model = build_individual_model(_individual(shapes_cfg("mask"), 0.25))
    backbone = model.backbone
    trunk = [m for m in backbone.bottom_up.modules() if isinstance(m, torch.nn.Conv2d)]
    trunk_ids = {id(m) for m in trunk}
    fpn = [m for m in backbone.modules()
           if isinstance(m, torch.nn.Conv2d) and id(m) not in trunk_ids]
    # c2_msra_fill: Kaiming normal, fan-out, gain sqrt(2). A slice of the width-1.0 tensors would
    # keep the wide layers' scale, about half of this at width 0.25.
    trunk_std = _normalised_std(trunk, lambda c: c.weight.shape[0] * c.weight[0, 0].numel())
    assert trunk_std == pytest.approx(math.sqrt(2), rel=0.05)
    # c2_xavier_fill: Kaiming uniform with a=1, fan-in, std 1/sqrt(fan_in).
    fpn_std = _normalised_std(fpn, lambda c: c.weight[0].numel())
    assert fpn_std == pytest.approx(1.0, rel=0.05)
    assert all(torch.all(c.bias == 0) for c in fpn if c.bias is not None)


def _perturbed(state):
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.mark.parametrize("source", ["stock", "slim"])
def test_weights_load_as_the_slimmable_model_uses_them_at_that_width(tmp_path, source):
    cfg = slim_cfg("mask", scope="backbone")
    torch.manual_seed(1)
    # A full-width stock checkpoint, or a slimmable one whose private norms differ from the stock.
    donor = build_individual_model(_individual(cfg, 1.0)) if source == "stock" else build_model(cfg)
    full = _perturbed(donor.state_dict())
    # A checkpoint for another number of classes: those tensors must be skipped, not sliced.
    full["roi_heads.box_predictor.cls_score.weight"] = torch.ones(6, 64)
    full["roi_heads.box_predictor.cls_score.bias"] = torch.ones(6)
    torch.save({"model": full}, tmp_path / "full.pth")

    model = build_individual_model(_individual(cfg, 0.5))
    checkpointer = make_checkpointer(_individual(cfg, 0.5), model)
    assert isinstance(checkpointer, IndividualCheckpointer)
    checkpointer.load(str(tmp_path / "full.pth"))
    loaded = model.state_dict()
    # The slimmable model loading the same checkpoint, exported at width 0.5, starts identically.
    slim = build_model(cfg).eval()
    DetectionCheckpointer(slim).load(str(tmp_path / "full.pth"))
    _, plain, _ = export_width(slim, cfg, 0.5)
    for key, value in plain.state_dict().items():
        if "cls_score" in key:
            assert not torch.equal(loaded[key], full[key][: loaded[key].shape[0]]), key
        else:
            torch.testing.assert_close(loaded[key], value, msg=key)
    if source == "slim":
        return

    # Converted ImageNet trunks (trunk names, matching_heuristics) of every kind load as well:
    # full width (sliced), slimmable (width 0.5's private norms) and already narrow (as is).
    slim_trunk = _perturbed({k: v for k, v in build_model(cfg).state_dict().items()
                             if k.startswith("backbone.bottom_up.")})
    narrow_trunk = _perturbed(build_individual_model(_individual(cfg, 0.5)).state_dict())
    for donor in (full, slim_trunk, narrow_trunk):
        trunk = {k[len("backbone.bottom_up."):]: v for k, v in donor.items()
                 if k.startswith("backbone.bottom_up.")}
        torch.save({"model": trunk, "matching_heuristics": True}, tmp_path / "trunk.pth")
        model = build_individual_model(_individual(cfg, 0.5))
        make_checkpointer(_individual(cfg, 0.5), model).load(str(tmp_path / "trunk.pth"))
        reference = build_model(cfg).eval()
        DetectionCheckpointer(reference).load(str(tmp_path / "trunk.pth"))
        _, plain, _ = export_width(reference, cfg, 0.5)
        expected = plain.backbone.bottom_up.state_dict()
        if donor is narrow_trunk:
            expected = {k[len("backbone.bottom_up."):]: v for k, v in donor.items()
                        if k.startswith("backbone.bottom_up.")}
        for key, value in model.backbone.bottom_up.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=key)


def test_individual_model_trains_evaluates_and_reloads(tmp_path):
    cfg = _individual(shapes_cfg("mask", output_dir=tmp_path), 0.5)
    trainer = train(cfg)
    assert slim_config.train_widths(cfg) == [0.5] and slim_config.test_widths(cfg) == [0.5]
    losses = {k for entry in read_metrics(tmp_path) for k in entry if k.endswith("/loss_cls")}
    assert losses == {"w0.5/loss_cls"}
    with open(tmp_path / "shapes_tiny_val" / "width_table.json") as f:
        rows = json.load(f)["rows"]
    assert [r["width"] for r in rows] == [0.5]
    params = sum(p.numel() for p in trainer.model.parameters())
    assert rows[0]["params_m"] == pytest.approx(params / 1e6)
    assert rows[0]["box_ap"] is not None and rows[0]["mask_ap"] is not None

    # --eval-only's path: build from the same config, load the final weights, evaluate.
    model = SlimTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    results = SlimTrainer.test(cfg, model)
    assert list(results) == ["w0.5"]
    assert results["w0.5"]["bbox"]["AP"] == pytest.approx(rows[0]["box_ap"])


@pytest.mark.parametrize("value", [1.5, -0.25, True, "0.5", float("nan")])
def test_bad_individual_width_names_key_and_value(value):
    cfg = shapes_cfg("mask")
    cfg.MODEL.SLIM.INDIVIDUAL_WIDTH = value
    with pytest.raises(ValueError, match=r"MODEL\.SLIM\.INDIVIDUAL_WIDTH .*got"):
        slim_config.slim_settings(cfg)
    with pytest.raises(ValueError, match=r"MODEL\.SLIM\.INDIVIDUAL_WIDTH"):
        SlimTrainer.build_model(cfg)


def test_individual_width_misuse_is_refused():
    stock_backbone = _individual(shapes_cfg("mask"), 0.5)
    stock_backbone.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    with pytest.raises(ValueError, match="build_resnet_fpn_backbone"):
        build_individual_model(stock_backbone)
    other_test_width = _individual(shapes_cfg("mask"), 0.5)
    other_test_width.MODEL.SLIM.TEST_WIDTHS = [0.25]
    with pytest.raises(ValueError, match=r"TEST_WIDTHS must be empty or \[0.5\]"):
        slim_config.test_widths(other_test_width)
    model = build_individual_model(_individual(shapes_cfg("mask"), 0.5))
    with pytest.raises(ValueError, match="trained individually at width 0.5"):
        slim_det.set_width(model, 1.0)


def _image_hashes(root, split):
    folder = os.path.join(root, split)
    return {hashlib.sha1(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.endswith(".png")}


def test_large_val_split_is_registered_and_disjoint_from_train(tmp_path):
    (split, (count, seed)), = LARGE_VAL_SPLITS.items()
    assert count >= 300 and seed not in {s for _, s in DEFAULT_SPLITS.values()}
    for name in ("shapes_val_large", "shapes_kp_val_large"):
        assert MetadataCatalog.get(name).image_root.endswith(os.path.join("_val_large", split))
    ensure_shapes(str(tmp_path / "large"), LARGE_VAL_SPLITS)
    ensure_shapes(str(tmp_path / "default"), DEFAULT_SPLITS)
    large = _image_hashes(tmp_path / "large", split)
    assert len(large) == count
    for other in ("train", "val"):
        assert not large & _image_hashes(tmp_path / "default", other), other


def test_fidelity_table_arithmetic():
    records = [
        {"family": "individual", "seed": s, "width": 0.5, "gflops": 1.0, "box_ap": ap}
        for s, ap in ((0, 10.0), (1, 12.0), (2, 14.0))
    ] + [
        {"family": "slimmable", "seed": s, "width": 0.5, "gflops": 1.0, "box_ap": ap}
        for s, ap in ((0, 13.0), (1, 13.0), (2, 16.0))
    ]
    rows = _fidelity_table.aggregate(records, ["individual", "slimmable"])
    assert [r["metric"] for r in rows] == ["box_ap"]  # absent metrics leave no row
    row = rows[0]
    assert row["individual"]["mean"] == 12.0 and row["individual"]["std"] == 2.0
    assert row["slimmable"]["min"] == 13.0 and row["difference"] == {"slimmable": 2.0}
    assert row["noise"] == 2.0
    table = _fidelity_table.markdown_table(rows, ["individual", "slimmable"])
    assert "12.0 → 14.0" in table and "+2.0" in table


def test_fidelity_table_summarizes_segmentation_metrics_of_one_family():
    """Panoptic FPN's mIoU and PQ rows, for a benchmark of the slimmable family alone."""
    records = [{"family": "slimmable", "seed": s, "width": 1.0, "gflops": 2.0, "box_ap": 50.0,
                "sem_seg_miou": miou, "pq": pq} for s, miou, pq in ((0, 80.0, 40.0),
                                                                   (1, 84.0, 44.0))]
    rows = _fidelity_table.aggregate(records, ["slimmable"])
    assert [r["metric"] for r in rows] == ["box_ap", "sem_seg_miou", "pq"]
    assert rows[1]["slimmable"]["mean"] == 82.0 and rows[2]["slimmable"]["min"] == 40.0
    assert all(r["difference"] == {} for r in rows)  # no individual baseline to subtract


def _write_metrics(folder, entries):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(folder)


def test_learning_curve_reads_every_evaluation_of_every_run(tmp_path):
    slim = _write_metrics(tmp_path / "slim", [
        {"iteration": 19, "total_loss": 3.0},  # a training line: no evaluation
        {"iteration": 99, "w1/bbox/AP": 10.0, "w0.5/bbox/AP": 4.0, "w1/segm/AP": 9.0},
        {"iteration": 200, "w1/bbox/AP": 30.0, "w0.5/bbox/AP": 20.0},  # the final evaluation
        {"iteration": 200, "w1/bbox/AP": 32.0, "w0.5/bbox/AP": 22.0},  # resumed: the last wins
    ])
    alone = _write_metrics(tmp_path / "alone", [
        {"iteration": 99, "w0.5/bbox/AP": 2.0}, {"iteration": 200, "w0.5/bbox/AP": float("nan")},
    ])
    records = (
        fidelity.curve_records({"family": "slimmable", "seed": 0, "width": None, "folder": slim},
                               [1.0, 0.5], 200)
        + fidelity.curve_records({"family": "individual", "seed": 0, "width": 0.5,
                                  "folder": alone}, [1.0, 0.5], 200)
        + fidelity.curve_records({"family": "individual", "seed": 1, "width": 0.5,
                                  "folder": str(tmp_path / "never_ran")}, [1.0, 0.5], 200)
    )
    assert {(r["family"], r["width"], r["iteration"]) for r in records} == {
        ("slimmable", 1.0, 100), ("slimmable", 0.5, 100), ("slimmable", 1.0, 200),
        ("slimmable", 0.5, 200), ("individual", 0.5, 100), ("individual", 0.5, 200)}
    first = next(r for r in records if r["family"] == "slimmable" and r["iteration"] == 100
                 and r["width"] == 1.0)
    assert first["mask_ap"] == 9.0 and first["keypoint_ap"] is None
    records.append(dict(records[-2], seed=1, box_ap=4.0))  # a second individual seed at 100
    points = _fidelity_table.learning_curve(records, ["individual", "slimmable"])
    assert [(p["family"], p["width"], p["iteration"]) for p in points][:2] == [
        ("individual", 0.5, 100), ("individual", 0.5, 200)]
    assert points[0]["mean"] == 3.0 and points[0]["n"] == 2
    assert math.isnan(points[1]["mean"])  # a failed evaluation shows, it is not dropped
    table = _fidelity_table.markdown_curve(points, "box AP")
    assert table.splitlines()[0] == "| box AP (mean over seeds) at widths | 100 | 200 |"
    assert "| slimmable 1 / 0.5 | 10.0 / 4.0 | 32.0 / 22.0 |" in table
    assert "| individual 0.5 | 3.0 | nan |" in table


def _run_fidelity(tmp_path, *extra):
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "fidelity.py"), "--tiny", "--device", "cpu",
           "--json-out", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    return run, out


def test_fidelity_benchmark_tiny_end_to_end_and_resumes(tmp_path):
    run, out = _run_fidelity(tmp_path, "--jobs", "2")  # two runs at once, results in plan order
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "fidelity" and printed["environment"]["tiny"] is True
    assert {(r["width"], r["metric"]) for r in printed["rows"]} == {
        (w, m) for w in (1.0, 0.5) for m in ("box_ap", "box_ap50", "mask_ap")}
    for row in printed["rows"]:
        assert row["individual"]["n"] == row["slimmable"]["n"] == 1
        assert row["gflops"]["individual"] == pytest.approx(row["gflops"]["slimmable"])
    assert not any(r["reused"] for r in printed["runs"]) and len(printed["runs"]) == 3
    assert [(r["family"], r["width"]) for r in printed["runs"]] == [
        ("individual", 1.0), ("individual", 0.5), ("slimmable", None)]
    folder = tmp_path / "output" / "fidelity"
    for name in ("fidelity.md", "fidelity.json", "fidelity_ap_vs_gflops.png"):
        assert (folder / name).stat().st_size > 0
    assert "individual → slimmable" in (folder / "fidelity.md").read_text()
    # Only the final evaluations (no TEST.EVAL_PERIOD): a curve of one point, not printed.
    assert {(p["family"], p["width"], p["iteration"], p["metric"])
            for p in printed["learning_curve"]} == {
        (f, w, 3, m) for f in ("individual", "slimmable") for w in (1.0, 0.5)
        for m in ("box_ap", "box_ap50", "mask_ap")}
    assert "mean over seeds) at widths" not in (folder / "fidelity.md").read_text()

    again, _ = _run_fidelity(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert all(r["reused"] for r in second["runs"])
    assert second["rows"] == printed["rows"]

    changed, _ = _run_fidelity(tmp_path, "--iters", "4")
    assert changed.returncode != 0 and "SOLVER.MAX_ITER" in changed.stderr

    no_jobs, _ = _run_fidelity(tmp_path, "--jobs", "0")
    assert no_jobs.returncode != 0 and "--jobs must be at least 1; got 0" in no_jobs.stderr


def test_fidelity_universal_family_is_a_valid_universal_config():
    args = fidelity.parse_args(["--widths", "1.0", "0.5", "0.35"])
    cfg = shapes_cfg("mask")
    (name, width, opts), = fidelity.universal_family(args, cfg)
    assert (name, width) == ("universal", None)
    cfg.merge_from_list(opts)
    slim_config.slim_settings(cfg)
    assert slim_config.is_universal(cfg)
    assert slim_config.test_widths(cfg) == [1.0, 0.5, 0.35]

def test_individual_width_needs_switchable_mode():
    cfg = _individual(shapes_cfg("mask"), 0.5)
    cfg.MODEL.SLIM.MODE = "universal"
    cfg.MODEL.SLIM.WIDTH_RANGE = [0.25, 1.0]
    with pytest.raises(ValueError, match=r"INDIVIDUAL_WIDTH 0.5 .*needs MODEL.SLIM.MODE "
                                         r"'switchable', got 'universal'"):
        slim_config.slim_settings(cfg)
