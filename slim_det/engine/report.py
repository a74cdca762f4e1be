"""The per-width results table: printed, and saved as Markdown, JSON and an AP-vs-GFLOPs plot."""
import json
import os

from tabulate import tabulate

__all__ = ["WIDTH_TABLE_COLUMNS", "TASK_METRICS", "SEGMENTATION_METRICS", "width_rows",
           "format_width_table", "save_width_report"]

# (row key, column title, number format)
WIDTH_TABLE_COLUMNS = (
    ("width", "width", "{:g}"),
    ("gflops", "GFLOPs", "{:.2f}"),
    ("backbone_gflops", "backbone GFLOPs", "{:.2f}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("box_ap", "box AP", "{:.1f}"),
    ("box_ap50", "box AP50", "{:.1f}"),
    ("mask_ap", "mask AP", "{:.1f}"),
    ("keypoint_ap", "kp AP", "{:.1f}"),
    ("sem_seg_miou", "mIoU", "{:.1f}"),
    ("pq", "PQ", "{:.1f}"),
    ("pq_things", "PQ things", "{:.1f}"),
    ("pq_stuff", "PQ stuff", "{:.1f}"),
    ("latency_ms", "latency (ms)", "{:.1f}"),
    ("note", "note", "{}"),
)
# Row key -> (task, metric) of a COCOEvaluator result; in metrics.json the same value is logged
# as ``w<width>/<task>/<metric>``.
TASK_METRICS = {"box_ap": ("bbox", "AP"), "box_ap50": ("bbox", "AP50"),
                 "mask_ap": ("segm", "AP"), "keypoint_ap": ("keypoints", "AP")}
# The same for SemSegEvaluator and COCOPanopticEvaluator results (Panoptic FPN, semantic
# segmentation); kept apart so that TASK_METRICS stays the COCO tasks its users read.
SEGMENTATION_METRICS = {"sem_seg_miou": ("sem_seg", "mIoU"), "pq": ("panoptic_seg", "PQ"),
                        "pq_things": ("panoptic_seg", "PQ_th"),
                        "pq_stuff": ("panoptic_seg", "PQ_st")}
# What the plot draws: (row key, label), each a curve against GFLOPs when a row has it.
_PLOTTED = (("box_ap", "box AP"), ("mask_ap", "mask AP"), ("keypoint_ap", "kp AP"),
            ("sem_seg_miou", "mIoU"), ("pq", "PQ"))


def width_rows(results_by_width, costs_by_width, latency_by_width):
    """Merge evaluation results, costs and latency into one row per width (widest first).

    Args:
        results_by_width (dict[float, dict]): evaluation results per width, by task (COCO's
            "bbox", "segm", "keypoints"; "sem_seg"; "panoptic_seg").
        costs_by_width (dict[float, dict]): ``{"gflops": float, "params": int}`` per width.
        latency_by_width (dict[float, float]): median milliseconds per batch.
    """
    rows = []
    for width in sorted(results_by_width, reverse=True):
        results, costs = results_by_width[width], costs_by_width.get(width, {})
        row = {"width": width, "gflops": costs.get("gflops"),
               "backbone_gflops": costs.get("backbone_gflops"),
               "params_m": costs["params"] / 1e6 if "params" in costs else None,
               "latency_ms": latency_by_width.get(width), "note": costs.get("note")}
        for key, (task, metric) in {**TASK_METRICS, **SEGMENTATION_METRICS}.items():
            if task in results:
                row[key] = results[task].get(metric)
        rows.append(row)
    return rows


def format_width_table(rows, fmt="pipe"):
    """Render rows as a table; columns absent from every row (e.g. mask AP) are left out."""
    columns = [c for c in WIDTH_TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    body = [
        ["-" if r.get(key) is None else pattern.format(r[key]) for key, _, pattern in columns]
        for r in rows
    ]
    return tabulate(body, headers=[title for _, title, _ in columns], tablefmt=fmt)


def save_width_report(rows, output_dir, caption=None):
    """Write ``width_table.md``, ``width_table.json`` and ``ap_vs_gflops.png`` to ``output_dir``.

    Args:
        caption (str or None): what the cost columns count; written under the table.

    Returns:
        dict[str, str]: the written paths by kind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("md", "width_table.md"), ("json", "width_table.json"), ("png", "ap_vs_gflops.png"))}
    with open(paths["md"], "w") as f:
        f.write(format_width_table(rows) + (f"\n\n{caption}\n" if caption else "\n"))
    with open(paths["json"], "w") as f:
        json.dump({"caption": caption, "rows": rows}, f, indent=2)

    fig, ax = plt.subplots(figsize=(5, 4))
    plotted = []
    for key, label in _PLOTTED:
        points = [(r["gflops"], r[key], r["width"]) for r in rows
                  if r.get(key) is not None and r.get("gflops") is not None]
        if points:
            plotted.append(label)
            points.sort()
            # A universal model's spectrum (e.g. 16 widths) is a curve: small markers, and only
            # every few widths labelled so the labels stay readable.
            many = len(points) > 8
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    markersize=3 if many else 6, label=label)
            step = -(-len(points) // 6) if many else 1
            for i, (x, y, w) in enumerate(points):
                if i % step == 0 or i == len(points) - 1:
                    ax.annotate(f"{w:g}x", (x, y), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("GFLOPs")
    # Only COCO's tasks: "AP", as always; with mIoU or PQ the axis names what it holds.
    coco_only = all(label.endswith("AP") for label in plotted)
    ax.set_ylabel("AP" if coco_only else " / ".join(plotted))
    ax.set_ylim(bottom=0)  # a zoomed axis makes a one-point AP gap look like a collapse
    ax.set_title(f"slim_det: {'AP' if coco_only else 'quality'} vs GFLOPs per width")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths
