"""Every benchmark runs in --tiny mode and emits valid JSON (no speed assertions)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = ["widths", "export_overhead", "switch", "train_step", "eval_pass", "gradients",
           "roi_align_backward", "config_step", "conv_paths"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_tiny_emits_json(name, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, f"{name}.py"), "--tiny", "--device", "cpu",
           "--json-out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == name
    assert printed["environment"]["tiny"] is True
    assert printed["rows"], "a benchmark must report at least one row"


def test_export_overhead_counts_what_the_slim_model_adds(tmp_path):
    # The shapes model is small enough at 64 px without --tiny's R-50 shrinking.
    cmd = [sys.executable, os.path.join(BENCHMARKS, "export_overhead.py"), "--device", "cpu",
           "--threads", "1", "--cpu-time", "--control", "--size", "64", "--widths", "1.0", "0.5",
           "--warmup", "0", "--repeats", "2", "--config-file",
           os.path.join(os.path.dirname(BENCHMARKS), "configs", "shapes",
                        "slim_mask_rcnn_shapes.yaml"), "TEST.DETECTIONS_PER_IMAGE", "5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed["clock"] == "thread CPU time"
    assert [r["scope"] for r in printed["rows"]] == ["slim_mask_rcnn_shapes.yaml"] * 2
    for row in printed["rows"]:
        assert row["slim_ms"] > 0 and row["plain_ms"] > 0 and row["control_ratio"] > 0
        assert row["max_feature_difference"] < 1e-3
        # The same network: as many ops or a few more (slices), and more Python for the slim one.
        assert row["plain_aten_ops"] > 100
        assert row["slim_aten_ops"] >= row["plain_aten_ops"]
        assert row["slim_python_calls"] > row["plain_python_calls"] > 100

    refused = subprocess.run(cmd[:4] + ["--threads", "2", "--cpu-time"], capture_output=True,
                             text=True, timeout=300, cwd=str(tmp_path))
    assert refused.returncode != 0
    assert "--cpu-time counts the calling thread only, so it needs --threads 1" in refused.stderr


def test_profile_widths_tiny_structure(tmp_path):
    """The profile's JSON: every part, detail, op count and ratio, for both models (and the plain
    models with --exported); parts add up to the mean latency."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "profile_widths.py"), "--tiny", "--device",
           "cpu", "--exported", "--json-out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "profile_widths"
    assert printed["environment"]["tiny"] is True and printed["inputs"] == "random"
    assert printed["devices"] == ["cpu"]
    rows = printed["rows"]
    assert [(r["model"], r["width"]) for r in rows] == [
        ("shapes", 1.0), ("shapes", 0.5), ("r50", 1.0), ("r50", 0.5)]
    parts = {"preprocess", "backbone", "fpn", "rpn", "roi_heads", "postprocess", "other"}
    for row in rows:
        assert row["weights"] == "random" and row["size"] == 64 and row["device"] == "cpu"
        assert set(row["parts_ms"]) == parts
        assert abs(sum(row["parts_ms"].values()) - row["mean_ms"]) < 1e-6 * row["mean_ms"] + 1e-6
        assert {"rpn_head", "rpn_proposals", "box_pooler", "mask_pooler", "mask_head"} <= set(
            row["details_ms"])
        assert row["details_ms"]["box_pooler"] > 0 and row["details_ms"]["mask_head"] > 0
        assert 0 < row["bottom_up_gflops"] < row["backbone_fpn_gflops"] < row["gflops"]
        assert row["gflops_per_s"] > 0 and row["speedup"] > 0 and row["plain_ms"] > 0
        assert row["slim_over_plain"] > 0
        ops = row["ops"]
        assert ops["top"] and {"name", "calls", "self_ms", "share"} == set(ops["top"][0])
        assert ops["calls"]["roi_align"] >= 8  # box and mask poolers, 4 levels each
        assert "parallel_roi_align" in ops["calls"] and ops["self_ms"]["nms"] >= 0
        assert ops["calls"]["slow_conv2d"] + ops["calls"]["mkldnn_conv"] > 0
    by_key = {(r["model"], r["width"]): r for r in rows}
    assert by_key[("r50", 1.0)]["speedup"] == 1.0
    assert by_key[("r50", 0.5)]["gflops_ratio"] > 2


def test_proposals_per_width_evaluates_every_variant(tmp_path):
    """benchmarks/proposals_per_width.py on one tiny trained-model folder and two variants."""
    from detectron2.modeling import build_model

    from tests.engine_helpers import shapes_cfg

    cfg = shapes_cfg("faster", str(tmp_path / "model"), **{"MODEL.PROPOSAL_GENERATOR.NAME": "RPN"})
    run = tmp_path / "model"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.dump())  # a config from before SlimRPN existed
    torch.save({"model": build_model(cfg).state_dict()}, run / "model_final.pth")
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "proposals_per_width.py"), "--runs", str(run),
           "--dataset", "shapes_tiny_val", "--output-dir", str(out),
           "--variant", "all=", "--variant", "fewer=[[0.5, 4]]", "TEST.CALIBRATION_IMAGES", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads((out / "proposals_per_width.json").read_text())
    assert printed["variants"] == {"all": "[]", "fewer": "[[0.5, 4]]"}
    assert {(r["family"], r["width"]) for r in printed["records"]} == {
        (v, w) for v in ("all", "fewer") for w in (1.0, 0.75, 0.5, 0.25)}
    assert [row["width"] for row in printed["latency"]] == [1.0, 0.75, 0.5, 0.25]
    assert all(row["ratio"]["fewer"] > 0 for row in printed["latency"])
    assert all(row["all"]["n"] == 1 for row in printed["rows"])
    # Each evaluation ran with its variant's table (what tools/train_net.py saved).
    saved = yaml.safe_load((out / "fewer" / "run0" / "config.yaml").read_text())["MODEL"]
    assert saved["PROPOSAL_GENERATOR"]["NAME"] == "SlimRPN"
    assert saved["SLIM"]["RPN_POST_NMS_TOPK_TEST"] == [[0.5, 4]]
    assert "fewer (ms)" in (out / "proposals_per_width.md").read_text()
