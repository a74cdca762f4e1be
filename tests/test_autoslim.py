"""The AutoSlim greedy search (slim_det.autoslim, tools/autoslim.py)."""
import json
import os
import sys

import pytest
import torch

import slim_det
from slim_det.analysis import detector_costs
from slim_det.autoslim import ConvCost, greedy_search, one_step_down
from slim_det.channels import channel_groups, load_channels, uniform_channels
from tests.engine_helpers import shapes_cfg
from tests.helpers import REPO, build, calibrate_bn_, images, slim_cfg


@pytest.fixture(scope="module")
def model():
    return calibrate_bn_(build(slim_cfg("mask", "all")), images(1, 96),
                         widths=(0.25, 0.5, 0.75, 1.0))


@pytest.fixture(scope="module")
def cost(model):
    return ConvCost(model, (128, 128), 50, 20)


def test_conv_cost_counts_backbone_and_heads(model, cost):
    # The backbone's count is fvcore's within 10% (fvcore also counts batch norms and upsampling).
    for width in (1.0, 0.5, 0.25):
        slim_det.set_width(model, width)
        fvcore = detector_costs(model, (128, 128), 50, 20)["backbone_gflops"]
        backbone_only = sum(
            i * o * p if not dw else o * p for og, ig, i, o, p, dw in _scaled(cost, model, width)
            if (og or ig or "").startswith("backbone"))
        assert backbone_only / 1e9 == pytest.approx(fvcore, rel=0.1)
    slim_det.set_width(model, 1.0)
    assert cost(uniform_channels(model, 0.25)) < cost(uniform_channels(model, 0.5)) < cost(
        uniform_channels(model, 1.0))


def _scaled(cost, model, width):
    config = uniform_channels(model, width)
    for og, ig, full_in, full_out, per_pair, dw in cost.calls:
        i = full_in if ig is None else config[ig]
        o = full_out if og is None else config[og]
        yield og, ig, i, (i * (full_out // full_in) if dw else o), per_pair, dw


def test_one_step_down_removes_a_twelfth():
    group = next(g for g in channel_groups(build(slim_cfg("mask", "all")))
                 if g.name == "backbone.bottom_up.res5")  # 512 channels, divisor 4
    assert one_step_down(group, 512, 1 / 12) == 468
    assert one_step_down(group, group.allowed[1], 1 / 12) == group.allowed[0]
    assert one_step_down(group, group.allowed[0], 1 / 12) is None


def _fake_score(groups):
    # Cutting a backbone channel costs 10x a head channel: the search must cut heads first.
    def score(config):
        return -sum((g.full - config[g.name]) / g.full * (10 if "bottom_up" in g.name else 1)
                    for g in groups)
    return score


def test_greedy_search_follows_the_scorer_stops_at_targets_and_resumes(model, cost):
    groups = channel_groups(model)
    full = cost({g.name: g.full for g in groups})
    targets = [0.8 * full, 0.6 * full]
    state = greedy_search(groups, cost, _fake_score(groups), targets)
    cuts = [p["cut"] for p in state["path"][1:]]
    assert not cuts[0].startswith("backbone.bottom_up")
    assert set(state["results"]) == {f"{t:g}" for t in targets}
    for key, result in state["results"].items():
        assert result["cost"] <= float(key)
    # It stops once the last target is reached.
    assert state["path"][-2]["cost"] > min(targets) >= state["path"][-1]["cost"]
    # Resuming from the state after a few rounds reaches the same result.
    saved = []
    partial = {"targets": sorted(targets, reverse=True), "step": 1 / 12,
               "path": [dict(p) for p in state["path"][:4]], "results": {}}
    for p in partial["path"]:
        for t in partial["targets"]:
            if f"{t:g}" not in partial["results"] and p["cost"] <= t:
                partial["results"][f"{t:g}"] = dict(p)
    resumed = greedy_search(groups, cost, _fake_score(groups), targets, state=partial,
                            on_round=lambda s: saved.append(len(s["path"])))
    assert [p["channels"] for p in resumed["path"]] == [p["channels"] for p in state["path"]]
    assert saved[0] == 5


def test_unreachable_target_names_the_smallest_cost(model, cost):
    groups = channel_groups(model)
    smallest = cost({g.name: g.allowed[0] for g in groups})
    with pytest.raises(ValueError, match=f"Cost target 1e-06 is unreachable: the smallest "
                                         f"configuration costs {smallest:.4g}"):
        greedy_search(groups, cost, _fake_score(groups), [1e-6])


def test_tool_searches_end_to_end_and_resumes(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import autoslim as tool

    cfg = shapes_cfg("mask")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    model = build(cfg)
    weights = tmp_path / "model.pth"  # every run below (and each worker) starts from these
    torch.save({"model": model.state_dict()}, weights)
    cost = ConvCost(model, (64, 64), cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                    cfg.TEST.DETECTIONS_PER_IMAGE)
    # Close to full width: one round of the search (one cut) reaches it.
    target = 0.97 * cost({g.name: g.full for g in channel_groups(model)})
    out = tmp_path / "search"
    argv = ["--config-file", str(config_file), "--target-gflops", f"{target:.6f}", "--output",
            str(out), "--calibration-images", "1", "--score-images", "1", "--step", "0.5",
            "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)]
    state = tool.main(argv)
    assert list(state["results"]) == [f"{float(f'{target:.6f}'):g}"]
    found = load_channels(str(out / f"gflops_{float(f'{target:.6f}'):g}.json"))
    assert set(found) == {g.name for g in channel_groups(model)}
    with open(out / f"gflops_{float(f'{target:.6f}'):g}.json") as f:
        assert json.load(f)["costs"]["gflops"] <= target
    assert (out / "search.png").exists() and (out / "log.txt").exists()
    rounds = len(state["path"])
    again = tool.main(argv)  # resumes a finished search: nothing more to do
    assert len(again["path"]) == rounds
    assert again["results"] == json.loads((out / "search.json").read_text())["results"]
    # Two worker processes score the candidates: the same cuts.
    parallel = tool.main(["--workers", "2"] + [a if a != str(out) else str(tmp_path / "parallel")
                                               for a in argv])
    assert [p["cut"] for p in parallel["path"]] == [p["cut"] for p in state["path"]]

    # benchmarks/autoslim.py on that search: in the supernet, proxies, one retraining run each.
    import importlib.util

    spec = importlib.util.spec_from_file_location(  # "autoslim" is tools/autoslim.py here
        "autoslim_benchmark", os.path.join(REPO, "benchmarks", "autoslim.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    key = f"{float(f'{target:.6f}'):g}"
    result = bench.main(["--config-file", str(config_file), "--supernet", str(weights),
                         "--search", str(out), "--targets", key, "--random", "1", "--seeds", "0",
                         "--rank-configs", "1", "--calibration-counts", "1",
                         "--output-dir", str(tmp_path / "bench"), "MODEL.DEVICE", "cpu",
                         "SOLVER.MAX_ITER", "3", "TEST.CALIBRATION_IMAGES", "2"])
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds[0] == "searched" and kinds[1].startswith("uniform_") and kinds[2] == "random_0"
    for row in result["rows"]:
        assert row["gflops"] == pytest.approx(result["rows"][0]["gflops"], rel=0.05)
        assert row["retrained"]["box_ap"]["n"] == 1
    assert set(result["spearman_by_proxy"]) == {"loss_cal1", "ap50", "ap", "gflops"}
    assert (tmp_path / "bench" / "autoslim.md").exists()


def test_tool_searches_on_latency_with_its_saved_table(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import autoslim as tool
    from slim_det.autoslim import LatencyCost

    cfg = shapes_cfg("mask")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    weights = tmp_path / "model.pth"
    model = build(cfg)
    torch.save({"model": model.state_dict()}, weights)
    groups = channel_groups(model)
    # A made-up table in the output folder, as an interrupted search leaves it: the tool must use
    # it (a measured one would not be linear in the channels like this).
    size = cfg.INPUT.MAX_SIZE_TEST  # the tool's counts: the table's calls must be its calls
    counts = ((size, size), cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)
    made_up = LatencyCost(model, *counts, stride=4,
                          timer=lambda op, c_in, c_out: (c_in + c_out) / 1000,
                          forward_timer=lambda configs: [30.0, 20.0, 15.0][:len(configs)])
    table = made_up.to_dict()
    out = tmp_path / "search"
    out.mkdir()
    (out / "latency_table.json").write_text(json.dumps(table))
    target = made_up.full_ms - 1e-4  # any one cut reaches it
    argv = ["--config-file", str(config_file), "--target-latency-ms", f"{target:.4f}",
            "--output", str(out), "--calibration-images", "1", "--score-images", "1",
            "--step", "0.5", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)]
    state = tool.main(argv)
    (key,) = state["results"]
    assert len(state["path"]) == 2  # full width, one cut
    saved = json.loads((out / f"ms_{key}.json").read_text())
    assert saved["costs"]["ms"] <= target
    assert saved["costs"]["ms"] == pytest.approx(made_up(saved["channels"]))
    assert "Latency table read from" in (out / "log.txt").read_text()

    # benchmarks/autoslim_latency.py on it (the search's own path stands in for a GFLOPs search).
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "autoslim_latency", os.path.join(REPO, "benchmarks", "autoslim_latency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--config-file", str(config_file), "--supernet", str(weights),
                         "--latency-search", str(out), "--gflops-search", str(out),
                         "--random", "1", "--uniform-step", "0.75", "--images", "2",
                         "--repeats", "1",
                         "--output-dir", str(tmp_path / "bench"), "MODEL.DEVICE", "cpu",
                         "TEST.CALIBRATION_IMAGES", "2"])
    assert set(result["cost_models"]) == {"fixed_ms", "e2e_ms"}
    assert [p["kind"] for p in result["points"]][-1] == "random_0"
    assert [r["kind"] for r in result["searches"]][:2] == ["latency search", "GFLOPs search"]
    for row in result["searches"] + result["points"]:
        assert row["table_ms"] == pytest.approx(made_up(row["channels"]))
        assert row["fixed_ms"] > 0 and row["e2e_ms"] > 0
    assert "box_ap" in result["searches"][0]["supernet"]
    assert (tmp_path / "bench" / "autoslim_latency.md").exists()


def test_a_latency_table_that_mispredicts_is_refused(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import autoslim as tool
    from slim_det.autoslim import LatencyCost
    from slim_det.inputs import InputError

    cfg = shapes_cfg("mask")
    model = build(cfg).eval()

    class Bogus(LatencyCost):  # predicts 1000 ms whatever the channels: a noise-made table
        def __init__(self, *args, **kwargs):
            super().__init__(*args, timer=lambda op, c_in, c_out: 0.0,
                             forward_timer=lambda configs: [1000.0] * len(configs), **kwargs)

    monkeypatch.setattr(tool, "LatencyCost", Bogus)
    with pytest.raises(InputError, match=r"does not predict this machine's latency: at uniform "
                                         r"width 0.75 it predicts 1000.0 ms, timed [0-9.]+ ms"):
        tool.latency_table(model, ((64, 64), 10, 5), str(tmp_path))
    assert not (tmp_path / "latency_table.json").exists()  # a rerun measures again
    assert json.loads((tmp_path / "latency_table_rejected.json").read_text())["checks"]


def test_latency_table_sums_its_layer_calls(model):
    from slim_det.autoslim import LatencyCost

    timed = []

    def fake_timer(op, c_in, c_out):  # bilinear in the channels: interpolation must be exact
        timed.append((op["kind"], c_in, c_out))
        return 0.01 + 1e-5 * c_in * max(c_out, 1) * (2 if op["kind"] == "linear" else 1)

    # A forward that is exactly the table's calls plus 5 ms plus 2 ms per million output values:
    # the fitted rest must recover both numbers.
    probe = LatencyCost(model, (64, 64), 10, 5, stride=3, timer=fake_timer,
                        forward_timer=lambda configs: [0.0] * len(configs))
    del timed[:]
    cost = LatencyCost(model, (64, 64), 10, 5, stride=3, timer=fake_timer, forward_timer=lambda
                       configs: [5 + 2 * probe.elements(c) / 1e6 + probe.layers_ms(c)
                                 for c in configs])
    assert cost.base_ms == pytest.approx(5.0) and cost.ms_per_melement == pytest.approx(2.0)
    assert [f["width"] for f in cost.fit] == [1.0, 0.5, 0.25]
    # Calls of the same shape in different groups (a stage's blocks) are timed once.
    assert len(timed) == cost.measurements < sum(
        len(op["grid_in"]) * len(op["grid_out"]) for op in cost.ops)
    groups = channel_groups(model)
    config = {g.name: g.allowed[len(g.allowed) // 2] for g in groups}
    expected = 5 + 2 * cost.elements(config) / 1e6
    for op in cost.ops:
        c_in = op["full_in"] if op["in_group"] is None else config[op["in_group"]]
        c_out = op["full_out"] if op["out_group"] is None else config[op["out_group"]]
        expected += op["calls"] * fake_timer(op, c_in, c_out)
    assert cost(config) == pytest.approx(expected)
    assert cost.elements(config) < cost.elements(cost.full_config())
    assert cost(config) < cost.full_ms
    # Every conv and linear call is in the table: backbone, FPN, RPN, box FCs, mask deconv.
    kinds = {op["kind"] for op in cost.ops}
    assert kinds == {"conv", "conv_transpose", "linear"}
    assert all(len(op["ms"]) == len(op["grid_in"]) and len(op["ms"][0]) == len(op["grid_out"])
               for op in cost.ops)
    # Saved and read back (a resumed search keeps its table); another model's table is refused.
    again = LatencyCost(model, (64, 64), 10, 5, table=json.loads(json.dumps(cost.to_dict())))
    assert again(config) == pytest.approx(cost(config))
    table = cost.to_dict()
    table["ops"] = table["ops"][1:]
    with pytest.raises(ValueError, match="lacks 1 that it makes.*another architecture"):
        LatencyCost(model, (64, 64), 10, 5, table=table)
    # Real timing runs too (the smallest and the full count per group here; no speed asserted).
    real = LatencyCost(model, (64, 64), 10, 5, stride=1000, warmup=1, repeats=1)
    assert real.full_ms > 0 and len(real.fit) == 3
    assert all(f["measured_ms"] > 0 for f in real.fit)
    assert all(len(op["grid_in"]) <= 2 for op in real.ops)


@pytest.mark.parametrize("proxy", ["loss", "ap50"])
def test_scorers_are_deterministic_and_leave_no_statistics(proxy, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import argparse

    import autoslim as tool

    cfg = shapes_cfg("mask")
    model = build(cfg).eval()
    options = argparse.Namespace(dataset=None, calibration_images=2, score_images=2, proxy=proxy)
    scorer = tool.build_scorer(cfg, model, options, str(tmp_path))
    config = uniform_channels(model, 0.5)
    first, second = scorer(config), scorer(config)
    assert first == second and first == first  # deterministic, not NaN
    names = {n for m in model.modules() if hasattr(m, "private") for n in m.private}
    assert not any(n.startswith("c") for n in names)  # candidates' statistics are forgotten


def test_supernet_comparison_evaluates_every_configuration_in_every_supernet(tmp_path):
    import importlib.util

    cfg = shapes_cfg("universal_mask")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    model = build(cfg)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    found = tmp_path / "found.json"
    slim_det.channels.save_channels(
        {g.name: g.allowed[len(g.allowed) // 2] for g in channel_groups(model)}, str(found))
    spec = importlib.util.spec_from_file_location(
        "autoslim_supernets", os.path.join(REPO, "benchmarks", "autoslim_supernets.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--supernet", "a", str(config_file), str(weights),
                         "--supernet", "b", str(config_file), str(weights),
                         "--configs", str(found), "--widths", "1.0", "--random", "1",
                         "--output-dir", str(tmp_path / "bench"), "MODEL.DEVICE", "cpu",
                         "TEST.CALIBRATION_IMAGES", "2"])
    assert [r["config"].split("_")[0] for r in result["rows"]] == ["uniform", os.path.relpath(
        str(found)).split("_")[0], "random"]
    for row in result["rows"]:  # one checkpoint under two names: the same evaluation
        assert row["ap"]["a"] == row["ap"]["b"]
    assert set(result["summary"]) == {"a", "b"}
    assert (tmp_path / "bench" / "autoslim_supernets.md").exists()
