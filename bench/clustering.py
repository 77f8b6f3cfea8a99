"""Figure 4: a participant's ball construction against bare k-means.

The images are CIFAR-10 training images loaded by grbfl's own loader (decoded once
and cached like a participant's), flattened to pixels in [0, 1]. The product is
``build_balls`` with the default ball settings, which is what the ``balls`` strategy
runs on a participant. Baseline: scikit-learn's KMeans alone, with the same settings
on the same matrix: per class, the same number of clusters, the same k-means++ seed
and the same single start, so the only difference is what grbfl does around it
(checking the samples, counting distinct rows, the exact ball statistics and the
report).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from bench.context import Context
from bench.report import Figure, Goal, best_of
from grbfl.balls import KMEANS_N_INIT, BallSettings, build_balls, class_ball_counts
from grbfl.data import discover_classes, export_digits, list_images, load_image_folder
from grbfl.simulate import DEFAULT_CACHE

GROUP = "4 clustering"
GOAL = Goal("ratio", "<=", 1.2, "ratio <= 1.2")


def load_pixels(ctx: Context, count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """count training images as flat float32 pixels, their labels, and a name."""
    if ctx.data is not None and ctx.mode != "tiny":
        root, name = ctx.data / "train", "CIFAR-10"
    else:
        root, _ = export_digits(ctx.scratch("digits"))
        name = "digits"
    classes = discover_classes(root)
    listing = list_images(root, classes)
    chosen = np.sort(np.random.default_rng(0).permutation(len(listing))[:count])
    images = load_image_folder(
        root,
        classes,
        files=[listing[i][0] for i in chosen],
        cache_dir=DEFAULT_CACHE / "images",
    )
    pixels = images.as_float().reshape(len(images), -1)
    return pixels, images.labels, name


def bare_kmeans(x: np.ndarray, y: np.ndarray, settings: BallSettings) -> None:
    """The clustering alone: one KMeans per class, as build_balls sets it up."""
    counts = np.bincount(y, minlength=10)
    wanted = class_ball_counts(counts, settings)
    for label in np.flatnonzero(wanted):
        seed = int(
            np.random.SeedSequence([settings.seed, int(label)]).generate_state(1)[0]
        )
        KMeans(
            n_clusters=int(wanted[label]),
            init="k-means++",
            n_init=KMEANS_N_INIT,
            random_state=seed,
        ).fit(x[y == label])


def run(ctx: Context) -> list[Figure]:
    count = ctx.pick(full=20_000, quick=5_000, tiny=1_000)
    ctx.say(f"clustering: loading {count} images")
    x, y, name = load_pixels(ctx, count)
    settings = BallSettings()
    repeats = ctx.pick(full=2, quick=1, tiny=1)

    # Alternate the two, so that whatever else runs on the machine weighs on both.
    product, baseline = [], []
    for _ in range(repeats):
        ctx.say(f"clustering: bare KMeans on {len(y)} x {x.shape[1]}")
        seconds, _ = best_of(1, bare_kmeans, x, y, settings)
        baseline.append(seconds)
        ctx.say("clustering: build_balls on the same matrix")
        seconds, result = best_of(1, build_balls, x, y, 10, settings)
        product.append(seconds)
    _, kept, report = result
    return [
        Figure(
            GROUP,
            f"build_balls, {len(y):,} {name} images",
            min(product),
            "s",
            min(baseline),
            "sklearn KMeans, same settings",
            GOAL,
            note=f"best of {repeats}; {report.found} balls, "
            f"{settings.n_clusters} wanted, {x.shape[1]} dims",
            detail={
                "product_s": product,
                "baseline_s": baseline,
                "found": report.found,
                "kept": report.kept,
            },
        )
    ]
