"""Class shapes: measured from shared balls' members, pooled, validated, sampled."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grbfl import strategy, wire
from grbfl.balls import BallSet, BallSettings, find_ball_members, sample_balls
from grbfl.errors import WireError
from grbfl.shapes import ClassShapes, class_shapes, pool_shapes
from grbfl.strategy import ServerStrategy


def _stretched(count: int, direction: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Points that spread std along direction and 0.1 on every dimension."""
    rng = np.random.default_rng(seed)
    unit = direction / np.linalg.norm(direction)
    along = rng.normal(0.0, std, size=(count, 1)) * unit
    return (5.0 + along + rng.normal(0.0, 0.1, size=(count, unit.shape[0]))).astype(
        np.float32
    )


def _one_ball(x: np.ndarray, label: int) -> BallSet:
    center = x.astype(np.float64).mean(axis=0)
    return BallSet(
        labels=np.array([label], np.int64),
        sizes=np.array([x.shape[0]], np.int64),
        centers=center[None].astype(np.float32),
        variances=x.var(axis=0)[None].astype(np.float32),
        radii=np.array([np.linalg.norm(x - center, axis=1).max() * 1.01], np.float32),
        owners=np.zeros(1, np.int64),
    )


def test_member_balls_are_the_balls_whose_statistics_the_members_give() -> None:
    """Every sample's ball, as find_ball_members says, has that sample among the
    members its size and centre were computed from."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=600)
    found, _, member_ball = find_ball_members(
        x, y, 3, BallSettings(n_clusters=24, variance_threshold=0.0, min_size=4)
    )

    assert member_ball.min() >= 0
    assert np.array_equal(np.bincount(member_ball, minlength=len(found)), found.sizes)
    assert np.array_equal(found.labels[member_ball], y)
    for ball in range(len(found)):
        members = x[member_ball == ball].astype(np.float64)
        assert np.allclose(members.mean(axis=0), found.centers[ball], atol=1e-5)


def test_shape_finds_the_direction_members_stray_along_and_its_spread() -> None:
    direction = np.arange(1.0, 17.0)
    x = _stretched(4000, direction, std=2.0, seed=0)
    y = np.zeros(4000, np.int64)
    center = x.astype(np.float64).mean(axis=0)[None].astype(np.float32)

    shapes = class_shapes(x, y, center, np.zeros(4000, np.int64), np.ones(1, bool))

    assert shapes.labels.tolist() == [0] and shapes.counts.tolist() == [4000]
    top = shapes.axes[0, 0].astype(np.float64)
    cosine = abs(top @ direction) / (np.linalg.norm(top) * np.linalg.norm(direction))
    assert cosine > 0.999
    assert np.linalg.norm(top) == pytest.approx(2.0, rel=0.05)


def test_shape_leaves_out_members_of_balls_that_are_not_shared() -> None:
    """A ball kept on the device, however stretched, does not shape its class."""
    tidy = _stretched(500, np.ones(8), std=0.5, seed=1)
    wild = _stretched(500, np.eye(8)[0], std=50.0, seed=2)
    x = np.concatenate([tidy, wild])
    y = np.zeros(1000, np.int64)
    member_ball = np.repeat([0, 1], 500)
    centers = np.stack([tidy.mean(axis=0), wild.mean(axis=0)]).astype(np.float32)

    both = class_shapes(x, y, centers, member_ball, np.array([True, True]))
    tidy_only = class_shapes(x, y, centers, member_ball, np.array([True, False]))

    assert np.linalg.norm(both.axes[0, 0]) > 30
    assert np.linalg.norm(tidy_only.axes[0, 0]) < 1
    assert tidy_only.counts.tolist() == [500]


def test_class_with_fewer_members_than_min_members_has_no_shape() -> None:
    x = np.concatenate(
        [_stretched(200, np.ones(4), 1.0, 3), _stretched(50, np.ones(4), 1.0, 4)]
    )
    y = np.repeat([0, 1], [200, 50])
    centers = np.stack([x[:200].mean(axis=0), x[200:].mean(axis=0)]).astype(np.float32)

    shapes = class_shapes(x, y, centers, y.copy(), np.ones(2, bool), min_members=100)

    assert shapes.labels.tolist() == [0]
    assert shapes.axes.shape == (1, 16, 4)


def test_pooled_shape_carries_the_member_weighted_covariance_of_its_parts() -> None:
    rng = np.random.default_rng(5)
    first = ClassShapes(
        np.array([2]), np.array([300]), rng.normal(size=(1, 3, 10)).astype(np.float32)
    )
    second = ClassShapes(
        np.array([2, 4]),
        np.array([100, 50]),
        rng.normal(size=(2, 3, 10)).astype(np.float32),
    )

    pooled = pool_shapes([first, second], rank=6)

    def covariance(axes: np.ndarray) -> np.ndarray:
        return axes.astype(np.float64).T @ axes.astype(np.float64)

    assert pooled.labels.tolist() == [2, 4] and pooled.counts.tolist() == [400, 50]
    expected = 0.75 * covariance(first.axes[0]) + 0.25 * covariance(second.axes[0])
    assert np.allclose(covariance(pooled.axes[0]), expected, atol=1e-4)
    assert np.allclose(
        covariance(pooled.axes[1]), covariance(second.axes[1]), atol=1e-4
    )


def test_samples_of_a_shaped_class_move_along_its_direction_together() -> None:
    """With a shape, points are correlated along it and keep the ball's own variance
    on each dimension; without one, dimensions vary on their own."""
    direction = np.ones(8) / np.sqrt(8)
    x = _stretched(3000, direction, std=1.0, seed=6)
    ball = _one_ball(x, label=0)
    shapes = class_shapes(
        x, np.zeros(3000, np.int64), ball.centers, np.zeros(3000, np.int64), [True]
    )

    shaped, _ = sample_balls(ball, 20000, np.random.default_rng(0), shapes=shapes)
    plain, _ = sample_balls(ball, 20000, np.random.default_rng(0))

    def correlation(points: np.ndarray) -> float:
        return float(np.corrcoef(points[:, 0], points[:, 1])[0, 1])

    assert correlation(shaped) == pytest.approx(correlation(x), abs=0.05)
    assert abs(correlation(plain)) < 0.05
    assert np.allclose(shaped.var(axis=0), ball.variances[0], rtol=0.1)


def test_shapes_survive_the_wire_and_bad_ones_are_refused_by_name() -> None:
    good = ClassShapes(
        np.array([0, 3]), np.array([200, 300]), np.ones((2, 4, 5), np.float32)
    )
    arrays = wire.decode_cbor(wire.encode_cbor(good.to_arrays()), limit=1 << 20)
    back = ClassShapes.from_arrays(arrays, dim=5, num_classes=4, max_count=500)
    assert np.array_equal(back.axes, good.axes)
    assert back.nbytes == good.nbytes

    def refused(**change: object) -> str:
        with pytest.raises(WireError) as caught:
            ClassShapes.from_arrays(
                {**good.to_arrays(), **change}, dim=5, num_classes=4, max_count=500
            )
        return str(caught.value)

    assert "'labels' names a class twice" in refused(labels=np.array([1, 1]))
    assert "outside [0, 4)" in refused(labels=np.array([0, 4]))
    assert "'counts'" in refused(counts=np.array([200, 501]))
    assert "'counts'" in refused(counts=np.array([0, 300]))
    assert "dims, expected 5" in refused(axes=np.ones((2, 4, 6), np.float32))
    assert "rank 65" in refused(axes=np.ones((2, 65, 5), np.float32))
    assert "NaN or infinite" in refused(axes=np.full((2, 4, 5), np.nan, np.float32))
    assert "NaN or infinite" in refused(axes=np.full((2, 4, 5), 1e30, np.float64))
    assert "disagree" in refused(counts=np.array([200]))
    assert "missing" in refused(axes=[[1.0]])


def _embed_update(
    tmp_path: Path,
    settings: dict[str, Any],
    state: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, Any]:
    """The update body of participant p1's embed phase on images x, labels y."""
    order = strategy.Order(
        "run", 1, "embed", 0, "a1", 0.0, "grbfl", settings, None, "cnn", ("a", "b")
    )
    data = strategy.LocalData(x, y, 2)
    return strategy.participant_work(
        order, state, data, "p1", tmp_path, threading.Event()
    )


def test_embed_update_carries_shapes_that_the_aggregator_takes_and_counts(
    tmp_path: Path,
) -> None:
    """A participant's embed phase sends class shapes measured on its own embeddings;
    they pass the wire and the aggregator's checks, and the round counts their bytes.
    The same shapes in a pixel-ball update, or claiming more members than the update's
    samples, are refused."""
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 200)
    x = rng.random((400, 3, 32, 32), dtype=np.float32) * 0.3
    x[y == 1, 0] += 0.5  # the second class is redder
    settings = {
        "n_clusters": 8,
        "variance_threshold": 0.0,
        "min_size": 5,
        "server_samples": 200,
        "server_epochs": 1,
        "batch_size": 16,
        "lr": 0.01,
    }
    server = ServerStrategy("grbfl", "cnn", 2, settings)

    body = _embed_update(tmp_path, settings, server.global_state(), x, y)
    received = wire.decode_cbor(wire.encode_cbor(body), limit=1 << 30)
    part = server.validate("embed", "p1", received, 0, 0)
    head_before = server.global_state()["head.weight"].copy()
    info = server.apply("embed", 1, [part])

    assert part.shapes is not None
    assert part.shapes.labels.tolist() == [0, 1]
    assert part.shapes.counts.tolist() == [200, 200]
    assert info["shape_bytes"] == part.shapes.nbytes > 0
    assert not np.array_equal(server.global_state()["head.weight"], head_before)
    with pytest.raises(WireError, match="phase balls carries no shapes"):
        ServerStrategy("balls", "cnn", 2, settings).validate(
            "balls", "p1", {**received, "balls": BallSet.empty(3072).to_arrays()}, 0, 0
        )
    with pytest.raises(WireError, match="'counts'"):
        server.validate("embed", "p1", {**received, "samples": 100}, 0, 0)


def test_shapes_that_their_balls_could_not_have_produced_are_refused(
    tmp_path: Path,
) -> None:
    """A shape's count must be its class's shared members, and its directions may
    explain no more spread than those balls hold: a participant cannot weigh its
    shape above others' or throw its class's samples to the balls' edges."""
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1], 200)
    x = rng.random((400, 3, 32, 32), dtype=np.float32)
    settings = {"n_clusters": 8, "variance_threshold": 0.0, "min_size": 5}
    server = ServerStrategy("grbfl", "cnn", 2, settings)
    body = _embed_update(tmp_path, settings, server.global_state(), x, y)
    shapes = body["shapes"]
    server.validate("embed", "p1", body, 0, 0)  # as sent: taken

    inflated = {**shapes, "counts": shapes["counts"] * 3}
    with pytest.raises(
        WireError, match="says 600 members for class 0, its balls hold 200"
    ):
        server.validate(
            "embed", "p1", {**body, "shapes": inflated, "samples": 1200}, 0, 0
        )
    first_class = {k: v[body["balls"]["labels"] == 0] for k, v in body["balls"].items()}
    with pytest.raises(WireError, match="for class 1, its balls hold 0"):
        server.validate("embed", "p1", {**body, "balls": first_class}, 0, 0)
    stretched = {**shapes, "axes": shapes["axes"] * np.float32(10)}
    with pytest.raises(WireError, match="spreads further than its balls' variances"):
        server.validate("embed", "p1", {**body, "shapes": stretched}, 0, 0)
    with pytest.raises(WireError, match="phase train carries no shapes"):
        weights = {k: v.copy() for k, v in server.expected_weights("train").items()}
        train_body = {"samples": 400, "weights": weights, "shapes": shapes}
        server.validate("train", "p1", train_body, 0, 0)


def test_pooling_many_participants_finds_the_exact_leading_directions() -> None:
    """Fifty participants, each with the top 16 directions of its own sample of one
    class, stack more rows than one exact SVD is taken for; the pooled directions
    match what the exact SVD of the stack finds."""
    rng = np.random.default_rng(0)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    spectrum = 1.0 / np.arange(1, dim + 1)
    sets = []
    for _ in range(50):
        x = rng.normal(size=(400, dim)) * spectrum @ basis.T
        shape = class_shapes(
            x.astype(np.float32),
            np.zeros(400, np.int64),
            x.mean(axis=0, keepdims=True).astype(np.float32),
            np.zeros(400, np.int64),
            np.ones(1, bool),
        )
        sets.append(shape)

    pooled = pool_shapes(sets).axes[0].astype(np.float64)

    stacked = np.concatenate([s.axes[0].astype(np.float64) for s in sets]) / np.sqrt(50)
    _, singular, right = np.linalg.svd(stacked, full_matrices=False)
    exact = right[:16] * singular[:16, None]
    assert stacked.shape[0] > 4 * 16  # the randomized path
    assert np.allclose(pooled.T @ pooled, exact.T @ exact, atol=1e-6)


def test_shape_rank_sets_what_is_sent_and_what_the_aggregator_takes(
    tmp_path: Path,
) -> None:
    """shape_rank 0 sends balls alone and an aggregator at 0 refuses shapes; an
    aggregator at rank 4 refuses shapes of rank 8; a rank outside 0..64 in a run
    message is refused by name."""
    rng = np.random.default_rng(8)
    y = np.repeat([0, 1], 150)
    x = rng.random((300, 3, 32, 32), dtype=np.float32)
    base = {"n_clusters": 6, "variance_threshold": 0.0, "min_size": 5}
    state = ServerStrategy("grbfl", "cnn", 2, base).global_state()

    def update(rank: object) -> dict[str, Any]:
        return _embed_update(tmp_path, {**base, "shape_rank": rank}, state, x, y)

    none = update(0)
    eight = update(8)

    assert "shapes" not in none and "balls" in none
    assert eight["shapes"]["axes"].shape == (2, 8, 256)
    ServerStrategy("grbfl", "cnn", 2, {**base, "shape_rank": 0}).validate(
        "embed", "p1", none, 0, 0
    )
    with pytest.raises(WireError, match=r"no shapes \(shape_rank is 0\)"):
        ServerStrategy("grbfl", "cnn", 2, {**base, "shape_rank": 0}).validate(
            "embed", "p1", eight, 0, 0
        )
    with pytest.raises(WireError, match="rank 8, expected 1..4"):
        ServerStrategy("grbfl", "cnn", 2, {**base, "shape_rank": 4}).validate(
            "embed", "p1", eight, 0, 0
        )
    for bad in (65, -1, "16", True, 2.0):
        with pytest.raises(WireError, match="settings.shape_rank"):
            update(bad)
