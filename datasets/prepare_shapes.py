"""Generates the embedded "shapes" dataset (all default splits), with its panoptic annotations.

Usage::

    python datasets/prepare_shapes.py [--root DIR] [--force]
"""
import argparse
import json
import os
import sys
import time

# Allow running from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slim_det.data.shapes import DEFAULT_SPLITS, default_root  # noqa: E402
from slim_det.data.shapes_panoptic import ensure_shapes_panoptic, panoptic_paths  # noqa: E402


def main() -> None:
    """Parses arguments, generates the splits and prints a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=None, help="output directory (default: $DETECTRON2_DATASETS/shapes)"
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()

    start = time.perf_counter()
    root = ensure_shapes_panoptic(args.root or default_root(), force=args.force)
    elapsed = time.perf_counter() - start

    print(f"shapes dataset at {os.path.abspath(root)} (ready in {elapsed:.1f}s)")
    for split in DEFAULT_SPLITS:
        for kind in ("instances", "keypoints"):
            path = os.path.join(root, "annotations", f"{kind}_{split}.json")
            with open(path) as f:
                data = json.load(f)
            print(
                f"  {path}: {len(data['images'])} images, "
                f"{len(data['annotations'])} annotations"
            )
        paths = panoptic_paths(root, split)
        with open(paths["panoptic_json"]) as f:
            num_segments = sum(len(a["segments_info"]) for a in json.load(f)["annotations"])
        print(f"  {paths['panoptic_json']}: {num_segments} segments")
        for folder in (os.path.join(root, split), paths["panoptic_root"], paths["sem_seg_root"]):
            num_png = sum(name.endswith(".png") for name in os.listdir(folder))
            print(f"  {folder}/: {num_png} PNG images")


if __name__ == "__main__":
    main()
