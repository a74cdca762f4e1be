"""Every benchmark runs in --tiny mode and emits valid JSON (no speed assertions)."""
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = ["widths", "export_overhead", "switch", "train_step", "eval_pass", "gradients",
           "roi_align_backward", "config_step"]


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
