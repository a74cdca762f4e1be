"""The fidelity benchmark's summary: per width and metric, each family's mean ± std over seeds.

Kept apart from `fidelity.py` (which runs the trainings) so the arithmetic and the table can be
read, and tested, on their own. Everything here works on plain dicts:

- a *record* is one model evaluated at one width: ``{"family", "seed", "width", "gflops",
  "params_m", "box_ap", "box_ap50", "mask_ap", "keypoint_ap", "sem_seg_miou", "pq", "pq_things",
  "pq_stuff"}`` (absent metrics missing or None);
- a *row* is one (width, metric) with a summary per family and each family's difference from
  the individually trained baseline.
"""
import statistics

BASELINE = "individual"
# (record key, label) in the order the paper reports them.
METRICS = (("box_ap", "box AP"), ("box_ap50", "box AP50"), ("mask_ap", "mask AP"),
           ("keypoint_ap", "kp AP"), ("sem_seg_miou", "mIoU"), ("pq", "PQ"),
           ("pq_things", "PQ things"), ("pq_stuff", "PQ stuff"))


def summarize(values):
    """n, mean, sample std (None for fewer than 2 values), min and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "values": values,
    }


def aggregate(records, families, baseline=BASELINE):
    """One row per (width, metric) present, widest first, metrics in `METRICS` order.

    Args:
        records (list[dict]): see the module docstring.
        families (list[str]): family names, in column order.
        baseline (str): the family the differences are taken from.

    Returns:
        list[dict]: rows ``{"width", "metric", "label", "gflops": {family: mean},
        "params_m": {family: mean}, "<family>": summary or None, "difference": {family: mean -
        baseline mean}, "noise": the largest std among the families}``.
    """
    rows = []
    for width in sorted({r["width"] for r in records}, reverse=True):
        at_width = [r for r in records if r["width"] == width]
        for key, label in METRICS:
            if all(r.get(key) is None for r in at_width):
                continue
            row = {"width": width, "metric": key, "label": label, "gflops": {}, "params_m": {}}
            for family in families:
                mine = [r for r in at_width if r["family"] == family]
                row[family] = summarize([r[key] for r in mine if r.get(key) is not None])
                for cost in ("gflops", "params_m"):
                    known = [r[cost] for r in mine if r.get(cost) is not None]
                    if known:
                        row[cost][family] = statistics.fmean(known)
            base = row.get(baseline)
            row["difference"] = {
                f: row[f]["mean"] - base["mean"]
                for f in families if f != baseline and row.get(f) and base
            }
            stds = [row[f]["std"] for f in families if row.get(f) and row[f]["std"] is not None]
            row["noise"] = max(stds) if stds else None
            rows.append(row)
    return rows


def _cell(summary):
    if summary is None:
        return "-"
    spread = "" if summary["std"] is None else f" ± {summary['std']:.1f}"
    return f"{summary['mean']:.1f}{spread} (min {summary['min']:.1f}, n={summary['n']})"


def markdown_table(rows, families, baseline=BASELINE):
    """The paper's format: baseline → other family, then each family's mean ± std and min."""
    others = [f for f in families if f != baseline]
    header = ["width", "GFLOPs", "metric"]
    if baseline in families:
        header += [f"{baseline} → {f}" for f in others]
    header += families + [f"Δ {f}" for f in others if baseline in families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        gflops = next(iter(row["gflops"].values()), None)
        cells = [f"{row['width']:g}", "-" if gflops is None else f"{gflops:.2f}", row["label"]]
        if baseline in families:
            base = row.get(baseline)
            for f in others:
                mine = row.get(f)
                cells.append(f"{base['mean']:.1f} → {mine['mean']:.1f}" if base and mine else "-")
        cells += [_cell(row.get(f)) for f in families]
        if baseline in families:
            cells += [f"{row['difference'][f]:+.1f}" if f in row["difference"] else "-"
                      for f in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_summary(runs, families):
    """Training cost per family and seed, all of a family's runs of that seed summed.

    Args:
        runs (list[dict]): ``{"family", "seed", "train_s", "s_per_iter"}`` per training run.

    Returns:
        dict[str, dict]: per family ``{"runs_per_seed", "per_seed_s": summary,
        "s_per_iter": summary or None}`` (s/iter only when every run logged it).
    """
    result = {}
    for family in families:
        mine = [r for r in runs if r["family"] == family]
        seeds = sorted({r["seed"] for r in mine})
        of_seed = [[r for r in mine if r["seed"] == s] for s in seeds]
        speeds = [sum(r["s_per_iter"] for r in rs) for rs in of_seed
                  if all(r.get("s_per_iter") is not None for r in rs)]
        result[family] = {
            "runs_per_seed": len(mine) // max(1, len(seeds)),
            "per_seed_s": summarize([sum(r["train_s"] for r in rs) for rs in of_seed]),
            "s_per_iter": summarize(speeds) if len(speeds) == len(seeds) else None,
        }
    return result


def _mean_std(summary, pattern):
    if summary is None:
        return "-"
    spread = "" if summary["std"] is None else " ± " + pattern.format(summary["std"])
    return pattern.format(summary["mean"]) + spread


def markdown_times(times):
    """Each family's training time per seed and its seconds per iteration (its runs summed)."""
    lines = ["| family | runs per seed | training time per seed (s) | s / iteration |",
             "|---|---|---|---|"]
    for family, t in times.items():
        lines.append(f"| {family} | {t['runs_per_seed']} | {_mean_std(t['per_seed_s'], '{:.0f}')}"
                     f" | {_mean_std(t['s_per_iter'], '{:.2f}')} |")
    return "\n".join(lines)


def plot(rows, families, path):
    """AP vs GFLOPs, one curve per family (mean, std as error bars), one panel per AP metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in METRICS if k not in ("box_ap50", "pq_things", "pq_stuff")
               and any(r["metric"] == k for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 4),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        labelled = set()
        for family in families:
            points = sorted(
                (r["gflops"][family], r[family]["mean"], r[family]["std"] or 0.0, r["width"])
                for r in rows if r["metric"] == key and r.get(family) and family in r["gflops"]
            )
            if not points:
                continue
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        yerr=[p[2] for p in points], marker="o", capsize=3, label=family)
            for x, y, _, w in points:
                if w not in labelled:  # the families share the widths: label each once
                    labelled.add(w)
                    ax.annotate(f"{w:g}x", (x, y), textcoords="offset points", xytext=(4, -10))
        ax.set_ylim(bottom=0)  # differences of a few AP must not look like a cliff
        ax.set_xlabel("GFLOPs")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs GFLOPs (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curve(records, families, metric="box_ap"):
    """``metric`` over training: per family, width and evaluated iteration, a summary over seeds.

    Args:
        records (list[dict]): like `aggregate`'s, each with an ``"iteration"`` (steps done when
            the model was evaluated).

    Returns:
        list[dict]: ``{"family", "width", "iteration", "metric", **summary}``, in family order,
        then widest first, then by iteration.
    """
    points = []
    for family in families:
        mine = [r for r in records if r["family"] == family and r.get(metric) is not None]
        for width in sorted({r["width"] for r in mine}, reverse=True):
            for iteration in sorted({r["iteration"] for r in mine if r["width"] == width}):
                values = [r[metric] for r in mine
                          if r["width"] == width and r["iteration"] == iteration]
                points.append(dict(summarize(values), family=family, width=width,
                                   iteration=iteration, metric=metric))
    return points


def markdown_curve(points, label):
    """One row per family, one column per iteration, each cell the mean at every width.

    Cells read ``a / b / ...`` over the family's widths, widest first; ``-`` where a width was not
    evaluated at that iteration.
    """
    iterations = sorted({p["iteration"] for p in points})
    lines = [f"| {label} (mean over seeds) at widths | " + " | ".join(map(str, iterations))
             + " |", "|" + "---|" * (len(iterations) + 1)]
    families = list(dict.fromkeys(p["family"] for p in points))
    for family in families:
        mine = [p for p in points if p["family"] == family]
        widths = sorted({p["width"] for p in mine}, reverse=True)
        mean = {(p["width"], p["iteration"]): p["mean"] for p in mine}
        cells = [" / ".join(f"{mean[w, i]:.1f}" if (w, i) in mean else "-" for w in widths)
                 for i in iterations]
        head = f"{family} " + " / ".join(f"{w:g}" for w in widths)
        lines.append("| " + " | ".join([head] + cells) + " |")
    return "\n".join(lines)
