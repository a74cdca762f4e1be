"""Two CPU processes (gloo) against one process over the same global batch."""
import os
import subprocess
import sys

import torch

from tests.engine_helpers import assert_same_state
from tests.helpers import REPO


def _run(num_procs, output):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "tests.dist_worker", "--num-procs", str(num_procs),
         "--output", str(output)],
        cwd=REPO, env=env, check=True, timeout=900,
    )


def test_two_processes_equal_one_process_over_the_same_global_batch(tmp_path):
    _run(2, tmp_path / "ddp")
    _run(1, tmp_path / "single")
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pth")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pth")
    single = torch.load(tmp_path / "single" / "rank0.pth")
    init = torch.load(tmp_path / "ddp" / "init.pth")
    assert_same_state(rank0, rank1)  # identical weights on both ranks
    assert_same_state(init, torch.load(tmp_path / "single" / "init.pth"))
    # One process over the same global batch: equal up to float summation order, which is
    # tiny next to how far 3 steps moved the weights.
    assert_same_state(rank0, single, atol=1e-4)
    moved = max((rank0[k] - init[k]).abs().max().item() for k in init if init[k].is_floating_point())
    assert moved > 1e-2
    key = "roi_heads.box_predictor.cls_score.weight"
    saved = torch.load(tmp_path / "ddp" / "run" / "model_final.pth")["model"]
    assert torch.equal(saved[key], rank0[key])
    private = "backbone.bottom_up.res2.0.conv1.norm.private"
    assert not any(k.startswith(private) for k in rank0)  # GN: no private norms to sync


def test_calibration_over_two_processes_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for procs in (2, 1):
        subprocess.run([sys.executable, "-m", "tests.dist_calibrate_worker", "--num-procs",
                        str(procs), "--output", str(tmp_path / str(procs))],
                       cwd=REPO, env=env, check=True, timeout=900)
    rank0, rank1 = (torch.load(tmp_path / "2" / f"rank{r}.pth") for r in (0, 1))
    single = torch.load(tmp_path / "1" / "rank0.pth")
    assert_same_state(rank0, rank1)  # the statistics were summed over both processes
    assert_same_state(rank0, single, atol=1e-5)  # = one process over all 8 images
    assert any(".private.w0_6.running_var" in k for k in single)
