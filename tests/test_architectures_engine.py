"""`SlimTrainer` on RetinaNet, Cascade Mask R-CNN and Panoptic FPN (configs/shapes/ leaf configs,
shrunk, on the tiny embedded data): every width trains and is evaluated with the evaluators of its
dataset, and the per-width table has every task's metrics and costs."""
import json
import os

import pytest

from tests.engine_helpers import read_metrics, shapes_cfg, train
from tests.helpers import fast_cpu  # noqa: F401  (autouse: one thread, no oneDNN)

WIDTHS = ["1", "0.75", "0.5", "0.25"]
# config (configs/shapes/slim_<name>_shapes.yaml) -> {task in metrics.json: (metric, table column)}
ARCHITECTURES = {
    "retinanet": {"bbox": ("AP", "box AP")},
    "cascade_mask_rcnn": {"bbox": ("AP", "box AP"), "segm": ("AP", "mask AP")},
    "panoptic_fpn": {"bbox": ("AP", "box AP"), "segm": ("AP", "mask AP"),
                     "sem_seg": ("mIoU", "mIoU"), "panoptic_seg": ("PQ", "PQ")},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_trains_and_reports_every_task_at_every_width(name, tmp_path):
    cfg = shapes_cfg(name, tmp_path)
    train(cfg)
    final = read_metrics(tmp_path)[-1]
    for width in WIDTHS:
        for task, (metric, _) in ARCHITECTURES[name].items():
            assert f"w{width}/{task}/{metric}" in final
        assert final[f"w{width}/cost/gflops"] > 0
    gflops = [final[f"w{w}/cost/gflops"] for w in WIDTHS]
    assert gflops == sorted(gflops, reverse=True)  # scope "all": narrower is cheaper
    report = os.path.join(tmp_path, cfg.DATASETS.TEST[0])
    with open(os.path.join(report, "width_table.md")) as f:
        header = f.readline()
    for _, column in ARCHITECTURES[name].values():
        assert f" {column} " in header
    with open(os.path.join(report, "width_table.json")) as f:
        table = json.load(f)
    assert [r["width"] for r in table["rows"]] == [1.0, 0.75, 0.5, 0.25]
    assert all(r["note"] is None for r in table["rows"])  # every width costed
    assert os.path.getsize(os.path.join(report, "ap_vs_gflops.png")) > 0
