"""`grbfl balls`: what a participant's data would share, for chosen settings.

The operator's tuning aid: no training, no broker; cluster the local images in
pixel space once per n_clusters and report, for each variance threshold, how
many balls would leave the device, how big they are and how many bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .balls import BallSettings, ball_bytes, find_balls, select_balls
from .data import discover_classes, export_digits, load_image_folder
from .errors import GrbflError
from .simulate import DEFAULT_CACHE


def sweep(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    clusters: list[int],
    thresholds: list[float],
    min_size: int,
) -> list[dict[str, Any]]:
    """One row per (n_clusters, threshold): counts, share kept, sizes, bytes."""
    rows = []
    for n_clusters in clusters:
        base = BallSettings(
            n_clusters=n_clusters, variance_threshold=0.0, min_size=min_size
        )
        start = time.perf_counter()
        found, exposes = find_balls(x, y, num_classes, base)
        seconds = time.perf_counter() - start
        for threshold in thresholds:
            kept, _ = select_balls(
                found,
                num_classes,
                replace(base, variance_threshold=threshold),
                exposes_sample=exposes,
            )
            sizes = kept.sizes
            per_class = np.bincount(kept.labels, minlength=num_classes).tolist()
            rows.append(
                {
                    "n_clusters": n_clusters,
                    "variance_threshold": threshold,
                    "min_size": min_size,
                    "found": len(found),
                    "kept": len(kept),
                    "share_kept": len(kept) / len(found) if len(found) else 0.0,
                    "samples_covered": int(sizes.sum()),
                    "size_min": int(sizes.min()) if len(sizes) else 0,
                    "size_median": float(np.median(sizes)) if len(sizes) else 0.0,
                    "size_max": int(sizes.max()) if len(sizes) else 0,
                    "kept_per_class": per_class,
                    "bytes": ball_bytes(kept),
                    "cluster_s": seconds,
                }
            )
    return rows


def ball_sweep(args: argparse.Namespace) -> None:
    if args.data is None:
        data_dir, _ = export_digits(DEFAULT_CACHE / "digits")
    else:
        data_dir = args.data
    if not data_dir.is_dir():
        raise GrbflError(f"--data {data_dir}: no such folder")
    classes = (
        tuple(c for c in args.classes.split(",") if c)
        if args.classes
        else discover_classes(data_dir)
    )
    if args.min_size < 1:
        raise GrbflError("--min-size must be at least 1")
    images = load_image_folder(data_dir, classes)
    if args.limit and len(images) > args.limit:
        rng = np.random.default_rng(0)
        images = images.subset(np.sort(rng.permutation(len(images))[: args.limit]))
    x = images.as_float().reshape(len(images), -1)
    print(
        f"{data_dir}: {len(images)} images, {len(classes)} classes, "
        f"{x.shape[1]} dimensions (pixels in [0, 1])"
    )
    rows = sweep(
        x, images.labels, len(classes), args.clusters, args.thresholds, args.min_size
    )
    print(
        f"{'balls':>6} {'thresh':>7} {'found':>6} {'kept':>6} {'share':>6} "
        f"{'covers':>7} {'size min/med/max':>17} {'kB':>8}  kept per class"
    )
    for r in rows:
        sizes = f"{r['size_min']}/{r['size_median']:.0f}/{r['size_max']}"
        print(
            f"{r['n_clusters']:>6} {r['variance_threshold']:>7.3g} {r['found']:>6} "
            f"{r['kept']:>6} {r['share_kept']:>6.0%} {r['samples_covered']:>7} "
            f"{sizes:>17} {r['bytes'] / 1e3:>8.1f}  {r['kept_per_class']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"written to {args.json}")
