"""benchmarks/universal.py (issue #9): switchable vs universal vs distilled, evaluated at the
trained widths and between them, sharing its runs with benchmarks/fidelity.py."""
import json
import os
import subprocess
import sys

import pytest

from tests.engine_helpers import shapes_cfg
from tests.helpers import REPO

BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import universal  # noqa: E402


def test_each_distillation_family_switches_on_only_its_terms():
    args = universal.parse_args(["--widths", "1.0", "0.5"])
    cfg = shapes_cfg("mask")
    for name, terms in [("universal_distill", {"rpn", "cls", "box"}),
                        ("universal_distill_cls", {"cls"}), ("universal_distill_rpn", {"rpn"})]:
        (folder, _, opts), = universal.FAMILIES[name](args, cfg)
        assert folder == name
        pairs = dict(zip(opts[::2], opts[1::2]))
        assert pairs["MODEL.SLIM.MODE"] == "universal"
        assert pairs["MODEL.SLIM.DISTILL.ENABLED"] == "True"
        for term, key in universal.TERMS.items():
            weight = float(pairs[f"MODEL.SLIM.DISTILL.{key}"])
            assert (weight > 0) == (term in terms), (name, term)
    # The switchable and universal families are fidelity.py's own: the same runs.
    import fidelity
    assert universal.FAMILIES["switchable"] is fidelity.slimmable_family
    assert universal.FAMILIES["universal"] is fidelity.universal_family


def test_distill_variant_is_a_family_of_its_own(capsys):
    args = universal.parse_args(["--widths", "1.0", "0.5", "--distill",
                                 "late=START_ITER 150 RAMP_ITERS 100 BOX_WEIGHT 0"])
    assert args.families == ["universal_distill_late"]  # no default families with --distill
    family = universal._variant("universal_distill_late", args.variants["universal_distill_late"])
    (folder, _, opts), = family(args, shapes_cfg("mask"))
    assert folder == "universal_distill_late"
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["MODEL.SLIM.MODE"] == "universal"
    assert pairs["MODEL.SLIM.DISTILL.ENABLED"] == "True"
    # Values take their key's type: "0" for a float weight is 0.0 (yacs refuses an int there).
    assert pairs["MODEL.SLIM.DISTILL.BOX_WEIGHT"] == "0.0"
    assert pairs["MODEL.SLIM.DISTILL.START_ITER"] == "150"
    assert "MODEL.SLIM.DISTILL.CLS_WEIGHT" not in pairs  # the config's own value

    both = universal.parse_args(["--families", "universal", "--distill", "a=GT_WEIGHT 0.5"])
    assert both.families == ["universal", "universal_distill_a"]

    for item, message in [
        ("late=FOO 1", "unknown MODEL.SLIM.DISTILL key 'FOO'"),
        ("late=START_ITER soon", "MODEL.SLIM.DISTILL.START_ITER takes a int; got 'soon'"),
        ("late=START_ITER", "--distill takes NAME="),
        ("=START_ITER 1", "--distill takes NAME="),
        ("cls=START_ITER 1", "are built-in families"),
        ("late=ENABLED False", "unknown MODEL.SLIM.DISTILL key 'ENABLED'"),
    ]:
        with pytest.raises(SystemExit):
            universal.parse_args(["--distill", item])
        assert message in capsys.readouterr().err, item
    with pytest.raises(SystemExit):
        universal.parse_args(["--distill", "a=START_ITER 1", "--distill", "a=START_ITER 2"])
    assert "--distill names must be distinct" in capsys.readouterr().err


def _run(tmp_path, *extra):
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "universal.py"), "--tiny", "--device", "cpu",
           "--json-out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))


def test_universal_benchmark_tiny_end_to_end(tmp_path):
    run = _run(tmp_path, "--jobs", "2")  # both families' runs at once
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "universal" and printed["environment"]["tiny"] is True
    families = ["switchable", "universal_distill_cls"]
    assert printed["families"] == families
    # The trained widths and the width between them, for every family.
    assert {r["width"] for r in printed["rows"]} == {1.0, 0.75, 0.5}
    for row in printed["rows"]:
        assert all(row[f]["n"] == 1 for f in families), row
        assert set(row["difference"]) == set(families[1:])
    assert all(printed["times"][f]["runs_per_seed"] == 1 for f in families)
    assert [r["family"] for r in printed["runs"]] == families
    folder = tmp_path / "output" / "fidelity"
    for name in ("universal.md", "universal.json", "universal_ap_vs_gflops.png"):
        assert (folder / name).stat().st_size > 0
    assert "switchable → universal_distill_cls" in (folder / "universal.md").read_text()
    # The switchable model's 0.75 was calibrated for the evaluation (it never trained there).
    log = (folder / "slimmable" / "seed0" / "spectrum" / "log.txt").read_text()
    assert "Calibrating batch-norm statistics at widths ['0.75']" in log

    again = _run(tmp_path)  # nothing retrained or re-evaluated
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training ->" not in again.stdout
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == printed["rows"]


def test_between_widths_are_checked():
    run = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "universal.py"), "--tiny",
                          "--between", "0.5"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "--between widths must lie strictly between 0.5 and 1" in run.stderr


def test_calibration_cost_tiny_end_to_end(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "calibration_cost.py"), "--tiny", "--images",
         "2", "4", "100", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    rows = {r["images"]: r for r in printed["rows"]}
    assert sorted(rows) == [0, 2, 4, 100]  # 0: the universal model's shared statistics
    assert rows[0]["note"] == "shared running statistics"
    assert "16 images" in rows[100]["skipped"]  # the tiny training set is smaller
    for count in (2, 4):
        assert rows[count]["seconds"] > 0 and set(rows[count]["per_width"]) == {"0.75"}
        assert "box_ap" in rows[count]["per_width"]["0.75"]
    assert (tmp_path / "output" / "calibration_cost" / "calibration_cost.md").stat().st_size > 0


def test_enough_images_is_the_smallest_count_within_tolerance():
    import calibration_cost

    rows = [{"images": 0, "mean_box_ap": 5.0}, {"images": 10, "mean_box_ap": 30.0},
            {"images": 30, "mean_box_ap": 39.7}, {"images": 100, "mean_box_ap": 40.0},
            {"images": 1000, "skipped": "too few"}]
    assert calibration_cost.enough(rows, 0.5) == 30
    assert calibration_cost.enough(rows, 0.1) == 100
