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
import contextlib
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

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
        shape = (labels.shape[0], DIMS)
        variances = BALL_VARIANCE * rng.gamma(20.0, 1 / 20.0, size=shape)
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
    """Seconds for all same-class distances and each ball's nearest other owner."""
    started = time.perf_counter()
    for label in np.unique(balls.labels):
        rows = np.flatnonzero(balls.labels == label)
        centers = balls.centers[rows]
        owners = balls.owners[rows]
        norms = np.einsum("ij,ij->i", centers, centers)
        nearest = np.empty(rows.shape[0], np.int64)
        for start in range(0, rows.shape[0], BASELINE_BLOCK):
            block = slice(start, start + BASELINE_BLOCK)
            squared = centers[block] @ centers.T
            squared *= -2
            squared += norms[block, None]
            squared += norms[None, :]
            squared[owners[block, None] == owners[None, :]] = np.inf
            nearest[block] = squared.argmin(axis=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closeness", type=float, default=0.5)
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads during the run, 0 for the library default (default: 1; "
        "on a busy 2-core machine more threads made small products many times slower)",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    limits = (
        threadpool_limits(limits=args.blas_threads, user_api="blas")
        if args.blas_threads > 0
        else contextlib.nullcontext()
    )
    with limits:
        run(args.closeness, skip_baseline=args.skip_baseline)


def run(closeness: float, *, skip_baseline: bool) -> None:
    """Merge both cases and time the baseline; print one line each."""
    threads = sorted({pool["num_threads"] for pool in threadpool_info()})
    print(f"BLAS/OpenMP threads in use: {threads}; times are wall (process CPU)")
    cases = [(100, 100, 1.0), (100, 1000, 10.0)]
    for participants, balls_each, budget in cases:
        balls = synthetic_balls(participants, balls_each)
        cpu = time.process_time()
        merged, stats = merge_balls(balls, closeness=closeness)
        cpu = time.process_time() - cpu
        per_class = np.bincount(merged.labels, minlength=CLASSES)
        verdict = "ok" if stats.seconds < budget else "OVER BUDGET"
        print(
            f"{participants} participants x {balls_each} balls x {DIMS} dims: "
            f"{stats.before} -> {stats.after} balls in {stats.seconds:.2f} s "
            f"({cpu:.2f} s), budget {budget:.0f} s {verdict}; {stats.passes} passes, "
            f"{stats.unverified} unverified searches, balls per class "
            f"{per_class.min()}..{per_class.max()}"
        )

    if not skip_baseline:
        cpu = time.process_time()
        naive = naive_nearest(balls)
        cpu = time.process_time() - cpu
        print(
            f"baseline for the large case, all same-class pairwise distances and "
            f"nearest other owner: {naive:.2f} s ({cpu:.2f} s), "
            f"{naive / stats.seconds:.1f}x the whole merge"
        )


if __name__ == "__main__":
    main()
