"""Figure 1: validating, merging and aggregating the updates of many participants.

The updates are built in memory as the aggregator holds them after decoding (the
wire figures time the decoding), and go through the aggregator's own strategy code:
``ServerStrategy.validate`` for every update, then ``ServerStrategy.apply``.

* Ball updates are grbfl's embedding balls of a ResNet-18 (512 dimensions), shaped
  like real ones (``bench_merge.synthetic_balls``), each with class shapes of the
  default rank. ``apply`` merges the balls, pools the shapes and then trains the
  head on samples of the merged balls; the bench asks for the fewest
  samples the config allows, so the time is the merge's. Baseline: the naive
  candidate search, all same-class pairwise distances and each ball's nearest ball
  of another owner, which is what a merge without pruning would start with.
* FedAvg updates are whole model states of the small CNN and of ResNet-18.
  Baseline: a bare numpy weighted sum over the same arrays, in float32, without
  validation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.bench_merge import naive_nearest, synthetic_balls
from bench.context import Context
from bench.report import Figure, Goal, best_of
from grbfl.balls import BallSet, BallSettings, select_balls
from grbfl.models import build_model
from grbfl.shapes import SHAPE_RANK, ClassShapes
from grbfl.strategy import Contribution, ServerStrategy
from grbfl.weights import state_to_numpy

GROUP = "1 aggregation"

# The goals: 100 x 100 balls in under 0.5 s, 100 x 1,000 in under 5 s, and
# FedAvg of 100 ResNet-18 states within twice a bare weighted sum.
GOAL_BALLS_100 = Goal("value", "<=", 0.5, "< 0.5 s")
GOAL_BALLS_1000 = Goal("value", "<=", 5.0, "< 5 s")
GOAL_FEDAVG = Goal("ratio", "<=", 2.0, "ratio <= 2")

# Server-side head training after the merge is not what this figure is about: the
# smallest sample count strategy.server_samples allows, and one epoch.
_SERVER_SAMPLES = 10


def _settings() -> dict[str, Any]:
    ball = BallSettings()
    return {
        "local_epochs": 1,
        "batch_size": 64,
        "lr": 0.05,
        "augment": False,
        "n_clusters": ball.n_clusters,
        "variance_threshold": ball.variance_threshold,
        "embedding_variance_threshold": 0.0,
        "min_size": ball.min_size,
        "server_samples": _SERVER_SAMPLES,
        "server_epochs": 1,
    }


def ball_bodies(balls: BallSet) -> list[dict[str, Any]]:
    """One decoded embed-phase update body per owner of the synthetic balls, with
    class shapes of the default rank that fit those balls."""
    bodies = []
    settings = BallSettings()
    rng = np.random.default_rng(1)
    for owner in np.unique(balls.owners):
        own = balls.subset(balls.owners == owner)
        _, report = select_balls(own, 10, settings)
        bodies.append(
            {
                "samples": int(own.sizes.sum()),
                "timings": {"embed_s": 1.0, "cluster_s": 1.0},
                "balls": {k: v.copy() for k, v in own.to_arrays().items()},
                "shapes": synthetic_shapes(own, rng).to_arrays(),
                "ball_report": report.as_dict(),
            }
        )
    return bodies


def synthetic_shapes(balls: BallSet, rng: np.random.Generator) -> ClassShapes:
    """Shapes of rank SHAPE_RANK whose directions explain half of each class's
    pooled ball variance, as check_fits_balls allows."""
    labels = np.unique(balls.labels)
    counts, axes = [], []
    for label in labels:
        mine = balls.labels == label
        sizes = balls.sizes[mine]
        pooled = (sizes[:, None] * balls.variances[mine]).sum(axis=0) / sizes.sum()
        signs = rng.choice([-1.0, 1.0], size=(SHAPE_RANK, balls.dim))
        axes.append(signs * np.sqrt(pooled / (2 * SHAPE_RANK)))
        counts.append(int(sizes.sum()))
    return ClassShapes(
        labels.astype(np.int64),
        np.asarray(counts, np.int64),
        np.asarray(axes, np.float32).reshape(len(labels), SHAPE_RANK, balls.dim),
    )


def aggregate(
    strategy: ServerStrategy, phase: str, bodies: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the aggregator does with a round's decoded bodies: validate each, apply.

    Returns apply's metrics, with the seconds of the two steps added.
    """
    started = time.perf_counter()
    parts: list[Contribution] = [
        strategy.validate(phase, f"p{i}", body, i, 0) for i, body in enumerate(bodies)
    ]
    validated = time.perf_counter()
    info = strategy.apply(phase, 1, parts)
    info["validate_s"] = validated - started
    info["apply_s"] = time.perf_counter() - validated
    return info


def bare_weighted_sum(
    states: list[dict[str, np.ndarray]], weights: list[float]
) -> dict[str, np.ndarray]:
    """The baseline: sum of weight times array, float32, no checks."""
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        acc = np.zeros(first.shape, np.float32)
        for state, weight in zip(states, weights, strict=True):
            acc += (weight / total) * state[name]
        out[name] = acc
    return out


def _ball_figures(ctx: Context) -> list[Figure]:
    figures = []
    strategy = ServerStrategy("grbfl", "resnet18", 10, _settings())
    cases = ctx.pick(
        full=[(3, 100), (10, 100), (50, 100), (100, 100), (100, 1000)],
        quick=[(3, 100), (100, 100)],
        tiny=[(3, 20)],
    )
    for participants, each in cases:
        ctx.say(f"aggregation: {participants} x {each} balls of 512 dims")
        balls = synthetic_balls(participants, each)
        bodies = ball_bodies(balls)
        repeats = 2 if each >= 1000 else 5
        seconds, info = best_of(repeats, aggregate, strategy, "embed", bodies)
        baseline, _ = best_of(repeats, naive_nearest, balls)
        goal = None
        if participants == 100:
            goal = GOAL_BALLS_1000 if each == 1000 else GOAL_BALLS_100
        figures.append(
            Figure(
                GROUP,
                f"balls, {participants} x {each} x 512 dims",
                seconds,
                "s",
                baseline,
                "all-pairs distances",
                goal,
                note=f"best of {repeats}; validate + merge + pool shapes + head on "
                f"{_SERVER_SAMPLES} samples",
                detail={
                    "balls_sent": info["balls_sent"],
                    "balls_after_merge": info["balls_after_merge"],
                    "merge_s": info["merge_s"],
                    "merge_unverified": info["merge_unverified"],
                    "validate_s": info["validate_s"],
                },
            )
        )
    return figures


def _fedavg_figures(ctx: Context, model: str, counts: list[int]) -> list[Figure]:
    if not counts:
        return []
    figures = []
    strategy = ServerStrategy("fedavg", model, 10, _settings())
    base = state_to_numpy(build_model(model, 10))
    payload = sum(array.nbytes for array in base.values())
    ctx.say(
        f"aggregation: building {max(counts)} {model} states "
        f"({max(counts) * payload / 1e9:.2f} GB)"
    )
    # Every participant's state is its own set of arrays, as after decoding.
    states = [
        {
            name: array + np.float32(1e-3 * i) if array.dtype.kind == "f" else array
            for name, array in base.items()
        }
        for i in range(max(counts))
    ]
    samples = [500 + 7 * i for i in range(len(states))]
    for count in counts:
        ctx.say(f"aggregation: FedAvg of {count} {model} states")
        bodies = [
            {"samples": samples[i], "timings": {"train_s": 1.0}, "weights": states[i]}
            for i in range(count)
        ]
        repeats = 3 if count * payload > 1e9 else 5
        seconds, info = best_of(repeats, aggregate, strategy, "train", bodies)
        baseline, _ = best_of(
            repeats, bare_weighted_sum, states[:count], samples[:count]
        )
        figures.append(
            Figure(
                GROUP,
                f"FedAvg {model}, {count} states",
                seconds,
                "s",
                baseline,
                "numpy weighted sum",
                GOAL_FEDAVG if model == "resnet18" and count == 100 else None,
                note=f"best of {repeats}; {count * payload / 1e6:.0f} MB of states; "
                f"validation {info['validate_s']:.3g} s, "
                f"averaging {info['apply_s']:.3g} s",
                detail={"validate_s": info["validate_s"], "apply_s": info["apply_s"]},
            )
        )
    return figures


def run(ctx: Context) -> list[Figure]:
    figures = _ball_figures(ctx)
    figures += _fedavg_figures(
        ctx, "cnn", ctx.pick(full=[3, 10, 50, 100], quick=[3, 100], tiny=[3])
    )
    figures += _fedavg_figures(
        ctx, "resnet18", ctx.pick(full=[3, 10, 50, 100], quick=[3, 10], tiny=[])
    )
    return figures
