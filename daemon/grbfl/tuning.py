"""`grbfl balls`: what a participant's data would share, for chosen settings.

The operator's tuning aid: no training, no broker; cluster the local images in
pixel space once per n_clusters and report, for each variance threshold, how
many balls would leave the device, how big they are and how many bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .balls import BallSettings, ball_bytes, find_balls, select_balls
from .data import discover_classes, export_digits, load_image_folder, random_subset
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


def check_options(args: argparse.Namespace) -> None:
    """GrbflError naming the first option of `grbfl balls` that cannot work.

    Checked before any image is decoded, so a typo costs no clustering time; the
    --json folder is created here for the same reason.
    """
    if not args.clusters:
        raise GrbflError("--clusters: give at least one value, e.g. 100 or 50,100")
    for n_clusters in args.clusters:
        if n_clusters < 1:
            raise GrbflError(f"--clusters {n_clusters}: each value must be at least 1")
    if not args.thresholds:
        raise GrbflError("--thresholds: give at least one value, e.g. 0.01,0.03")
    for threshold in args.thresholds:
        if not math.isfinite(threshold) or threshold < 0:
            raise GrbflError(
                f"--thresholds {threshold}: each value must be a finite number >= 0"
            )
    if args.min_size < 1:
        raise GrbflError(f"--min-size {args.min_size}: must be at least 1")
    if args.limit < 0:
        raise GrbflError(f"--limit {args.limit}: must be 0 (all images) or more")
    if args.json:
        path = Path(args.json)
        if path.is_dir():
            raise GrbflError(f"--json {path}: is a folder; name a file to write")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrbflError(
                f"--json {path}: cannot create its folder: {exc.strerror or exc}"
            ) from exc


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON next to path, then rename: never half a file at path."""
    text = json.dumps(rows, indent=2) + "\n"
    # A plain open (not mkstemp) so the file gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise GrbflError(f"--json {path}: cannot write: {exc.strerror or exc}") from exc


def ball_sweep(args: argparse.Namespace) -> None:
    check_options(args)
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
    images = load_image_folder(data_dir, classes)

    # A random draw in each class's proportion: the first N files would be the
    # first classes only.
    images = random_subset(images, args.limit, seed=0)
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
        write_json(Path(args.json), rows)
        print(f"written to {args.json}")
