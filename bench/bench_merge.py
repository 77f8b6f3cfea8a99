"""Time ``merge_balls`` on the aggregator's largest expected loads.

Run from the repository root: ``.venv/bin/python bench/bench_merge.py``.

The balls are synthetic but shaped like real ones: every class has a few hundred modes
in a 512-dimensional embedding space, every participant finds a ball near each mode of
its classes, shifted by a per-participant offset (its data skew) and by the sampling
noise of the ball's own members. As a baseline, the same run times the naive candidate
search for the large case: all pairwise same-class distances (as one matrix product per
block) with each ball's nearest ball of another owner.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from grbfl.balls import BallSet, merge_balls

DIMS = 512
CLASSES = 10

# Scales of the synthetic space, relative to a ball's per-dimension variance of 0.5
# (spread sqrt(512 * 0.5) = 16): modes of a class lie about 1.5 spreads apart,
# participants' offsets put their copies of one mode about 0.3 spreads apart.
BALL_VARIANCE = 0.5
MODE_SCALE = 0.75
OFFSET_SCALE = 0.15
SIZE_RANGE = (5, 60)

# Rows of the baseline's distance matrix computed at once.
BASELINE_BLOCK = 2048


def synthetic_balls(participants: int, balls_each: int, seed: int = 0) -> BallSet:
    """Balls of ``participants`` owners with ``balls_each`` balls each, in 512 dims."""
    rng = np.random.default_rng(seed)
    per_class = balls_each // CLASSES
    class_means = rng.standard_normal((CLASSES, 1, DIMS)) * 2.0
    modes = class_means + rng.standard_normal((CLASSES, per_class, DIMS)) * MODE_SCALE
    labels = np.repeat(np.arange(CLASSES), per_class)
    flat_modes = modes.reshape(-1, DIMS)

    sets = []
    for owner in range(participants):
        offset = rng.standard_normal((CLASSES, 1, DIMS)) * OFFSET_SCALE
        sizes = rng.integers(*SIZE_RANGE, size=labels.shape[0])
        variances = BALL_VARIANCE * rng.gamma(20.0, 1 / 20.0, size=(labels.shape[0], DIMS))
        noise = rng.standard_normal((labels.shape[0], DIMS)) * np.sqrt(
            variances / sizes[:, None]
        )
        centers = flat_modes + np.repeat(offset, per_class, axis=1).reshape(-1, DIMS)
        centers = centers + noise
        spread = np.sqrt(variances.sum(axis=1))
        sets.append(
            BallSet(
                labels=labels.astype(np.int64),
                sizes=sizes.astype(np.int64),
                centers=centers.astype(np.float32),
                variances=variances.astype(np.float32),
                radii=(2.0 * spread).astype(np.float32),
                owners=np.full(labels.shape[0], owner, np.int64),
            )
        )
    return BallSet.concat(sets)


def naive_nearest(balls: BallSet) -> float:
    """Seconds for all same-class pairwise distances and each ball's nearest other owner."""
    started = time.perf_counter()
    for label in np.unique(balls.labels):
        rows = np.flatnonzero(balls.labels == label)
        centers = balls.centers[rows]
        owners = balls.owners[rows]
        norms = np.einsum("ij,ij->i", centers, centers)
        nearest = np.empty(rows.shape[0], np.int64)
        for start in range(0, rows.shape[0], BASELINE_BLOCK):
            block = slice(start, start + BASELINE_BLOCK)
            squared = norms[block, None] + norms[None, :] - 2 * centers[block] @ centers.T
            squared[owners[block, None] == owners[None, :]] = np.inf
            nearest[block] = squared.argmin(axis=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closeness", type=float, default=0.5)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    cases = [(100, 100, 1.0), (100, 1000, 10.0)]
    for participants, balls_each, budget in cases:
        balls = synthetic_balls(participants, balls_each)
        merged, stats = merge_balls(balls, closeness=args.closeness)
        per_class = np.bincount(merged.labels, minlength=CLASSES)
        verdict = "ok" if stats.seconds < budget else "OVER BUDGET"
        print(
            f"{participants} participants x {balls_each} balls x {DIMS} dims: "
            f"{stats.before} -> {stats.after} balls in {stats.seconds:.2f} s "
            f"(budget {budget:.0f} s, {verdict}); {stats.passes} passes, "
            f"{stats.unverified} unverified searches, balls per class "
            f"{per_class.min()}..{per_class.max()}"
        )

    if not args.skip_baseline:
        naive = naive_nearest(balls)
        print(
            f"baseline, all same-class pairwise distances for the large case: "
            f"{naive:.2f} s, {naive / stats.seconds:.1f}x the merge"
        )


if __name__ == "__main__":
    main()
