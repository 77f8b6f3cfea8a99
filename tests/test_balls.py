"""Granular balls: finding, filtering, merging, sampling and wire validation."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits

from grbfl import balls as balls_module
from grbfl.balls import (
    BallSet,
    BallSettings,
    ball_bytes,
    build_balls,
    class_ball_counts,
    find_balls,
    is_degenerate,
    merge_balls,
    sample_balls,
    select_balls,
)
from grbfl.errors import WireError


def _ball_of(members: np.ndarray, label: int, owner: int) -> BallSet:
    """One ball whose statistics are computed straight from its members."""
    members = members.astype(np.float64)
    center = members.mean(axis=0)
    return BallSet(
        labels=np.array([label], np.int64),
        sizes=np.array([members.shape[0]], np.int64),
        centers=center[None].astype(np.float32),
        variances=members.var(axis=0)[None].astype(np.float32),
        radii=np.array(
            [np.linalg.norm(members - center, axis=1).max() * (1 + 1e-6)], np.float32
        ),
        owners=np.array([owner], np.int64),
    )


def _blobs(
    counts: list[int], dim: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Samples of each class around its own mean, with distinct rows."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, count in enumerate(counts):
        xs.append(rng.normal(3.0 * label, 1.0, size=(count, dim)))
        ys.append(np.full(count, label))
    x = np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, dim), np.float32)
    return x, np.concatenate(ys).astype(np.int64)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]."""
    data = load_digits()
    return (data.data / 16).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def digit_balls(digits: tuple[np.ndarray, np.ndarray]) -> BallSet:
    """Kept balls of three participants holding a third of the digits each."""
    x, y = digits
    owner = np.random.default_rng(0).permutation(len(y)) % 3
    settings = BallSettings(n_clusters=30, variance_threshold=0.0, min_size=5)
    sets = []
    for participant in range(3):
        mine = owner == participant
        _, kept, _ = build_balls(x[mine], y[mine], 10, settings)
        kept.owners[:] = participant
        sets.append(kept)
    return BallSet.concat(sets)


# -- finding -------------------------------------------------------------------------


def test_building_twice_with_same_input_and_settings_gives_identical_balls(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """k-means is seeded from the settings, so a rerun reproduces every array."""
    x, y = digits
    settings = BallSettings(n_clusters=40, seed=3)

    first = build_balls(x, y, 10, settings)
    second = build_balls(x, y, 10, settings)

    for one, other in zip(first[:2], second[:2], strict=True):
        for name, array in one.to_arrays().items():
            np.testing.assert_array_equal(array, other.to_arrays()[name], err_msg=name)
    assert first[2] == second[2]


def test_building_with_another_seed_gives_other_balls(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """The seed is really used, so reruns of a round are reproducible by choice."""
    x, y = digits

    found_a, _, _ = build_balls(x, y, 10, BallSettings(n_clusters=40, seed=0))
    found_b, _, _ = build_balls(x, y, 10, BallSettings(n_clusters=40, seed=1))

    assert not np.array_equal(found_a.centers, found_b.centers)


def test_ball_counts_follow_class_shares_of_n_clusters() -> None:
    """Counts split n_clusters by class share and add up to it."""
    counts = np.array([600, 300, 100])

    wanted = class_ball_counts(counts, BallSettings(n_clusters=10, min_size=5))

    assert wanted.tolist() == [6, 3, 1]


def test_ball_counts_give_a_tiny_class_one_ball_and_an_empty_class_none() -> None:
    """A class whose share rounds to zero still gets a ball; an empty one gets none."""
    counts = np.array([990, 10, 0])

    wanted = class_ball_counts(counts, BallSettings(n_clusters=10, min_size=5))

    assert wanted.tolist() == [10, 1, 0]


def test_ball_counts_never_ask_more_balls_than_min_size_samples_can_fill() -> None:
    """Each ball could hold min_size samples: count // min_size caps the share."""
    counts = np.array([100, 100])

    wanted = class_ball_counts(counts, BallSettings(n_clusters=100, min_size=20))

    assert wanted.tolist() == [5, 5]


def test_built_balls_per_class_match_the_wanted_counts() -> None:
    """build_balls finds exactly the wanted number of balls in distinct data."""
    x, y = _blobs([300, 120, 60])
    settings = BallSettings(n_clusters=24, min_size=5, variance_threshold=0.0)

    found, _, report = build_balls(x, y, 3, settings)

    expected = class_ball_counts(np.array([300, 120, 60]), settings)
    assert [report.per_class_found[c] for c in range(3)] == expected.tolist()
    assert np.bincount(found.labels, minlength=3).tolist() == expected.tolist()
    assert found.sizes.sum() == 480


def test_ball_statistics_equal_those_computed_from_its_members() -> None:
    """One ball per class: its size, mean, variance and radius are the class's own."""
    x, y = _blobs([40, 25], dim=6, seed=4)
    x += 1000.0  # far from zero, where float32 rounding of the centre shows

    found, _, _ = build_balls(x, y, 2, BallSettings(n_clusters=2, min_size=5))

    for label in (0, 1):
        members = x[y == label].astype(np.float64)
        row = int(np.flatnonzero(found.labels == label)[0])
        center = found.centers[row].astype(np.float64)
        gaps = np.linalg.norm(members - center, axis=1)
        assert found.sizes[row] == members.shape[0]
        np.testing.assert_allclose(center, members.mean(axis=0), rtol=1e-7)
        np.testing.assert_allclose(found.variances[row], members.var(axis=0), rtol=1e-5)
        assert gaps.max() <= found.radii[row] <= gaps.max() * (1 + 1e-6)


def test_empty_class_yields_no_balls_without_error() -> None:
    """A class with no samples is reported with zero balls."""
    x, y = _blobs([50, 0, 50])

    found, kept, report = build_balls(x, y, 3, BallSettings(n_clusters=10))

    assert report.per_class_found[1] == 0
    assert report.per_class_kept[1] == 0
    assert 1 not in found.labels


def test_class_smaller_than_min_size_yields_one_ball_that_is_not_shared() -> None:
    """Three samples cannot make a ball of five: found once, never kept."""
    x, y = _blobs([60, 3])

    found, kept, report = build_balls(x, y, 2, BallSettings(n_clusters=10, min_size=5))

    assert report.per_class_found[1] == 1
    assert found.sizes[found.labels == 1].tolist() == [3]
    assert report.per_class_kept[1] == 0
    assert report.too_small == (found.sizes < 5).sum() >= 1
    assert 1 not in kept.labels


def test_all_duplicate_samples_give_one_ball_that_is_not_shared() -> None:
    """Identical samples form one zero-variance ball, which never leaves the device."""
    x = np.ones((40, 6), np.float32)
    y = np.zeros(40, np.int64)

    found, kept, report = build_balls(
        x, y, 1, BallSettings(n_clusters=8, variance_threshold=0.0)
    )

    assert len(found) == 1
    assert found.sizes.tolist() == [40]
    assert found.radii.tolist() == [0.0]
    assert len(kept) == 0


def test_duplicates_cap_clusters_at_the_number_of_distinct_samples() -> None:
    """Three distinct points repeated make at most three balls, none empty."""
    points = np.array([[0, 0], [5, 5], [9, 0]], np.float32)
    x = np.repeat(points, 10, axis=0)
    y = np.zeros(30, np.int64)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k-means warns when asked for too many
        found, _, _ = build_balls(x, y, 1, BallSettings(n_clusters=6, min_size=2))

    assert len(found) == 3
    assert sorted(found.sizes.tolist()) == [10, 10, 10]


def test_lower_variance_threshold_keeps_at_least_as_many_balls(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Kept balls are exactly those above the threshold, so lowering it keeps more."""
    x, y = digits
    found, exposes = find_balls(x, y, 10, BallSettings(n_clusters=60))
    mean_variance = found.variances.mean(axis=1)
    thresholds = np.quantile(mean_variance, [0.2, 0.5, 0.8])

    kept_counts = []
    for threshold in thresholds:
        settings = BallSettings(n_clusters=60, variance_threshold=float(threshold))
        kept, report = select_balls(found, 10, settings, exposes_sample=exposes)
        assert (kept.variances.mean(axis=1) > threshold).all()
        assert (kept.sizes >= settings.min_size).all()
        kept_counts.append(report.kept)

    assert kept_counts[0] > kept_counts[1] > kept_counts[2] > 0


def test_no_kept_centre_equals_an_input_sample(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """With min_size >= 2 a shared centre is never a single sample."""
    x, y = digits

    _, kept, _ = build_balls(
        x, y, 10, BallSettings(n_clusters=300, min_size=2, variance_threshold=0.0)
    )

    equal = (kept.centers[:, None, :] == x[None, :, :]).all(axis=2)
    assert len(kept) > 100
    assert not equal.any()


def test_centre_that_is_one_of_its_members_is_not_shared() -> None:
    """Symmetric members put the mean on a member; such a ball stays home."""
    x = np.array([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    y = np.zeros(3, np.int64)

    found, kept, _ = build_balls(
        x, y, 1, BallSettings(n_clusters=1, min_size=2, variance_threshold=0.0)
    )

    assert found.centers.tolist() == [[0.0, 0.0]]
    assert len(kept) == 0


def test_report_counts_sizes_and_bytes_of_kept_balls() -> None:
    """The report's numbers agree with the returned balls."""
    x, y = _blobs([200, 100], dim=5)

    found, kept, report = build_balls(
        x, y, 2, BallSettings(n_clusters=12, variance_threshold=0.5)
    )

    assert report.found == len(found)
    assert report.kept == len(kept)
    assert report.share_kept == pytest.approx(len(kept) / len(found))
    assert report.size_min == found.sizes.min()
    assert report.size_max == found.sizes.max()
    assert report.too_small == (found.sizes < 5).sum()
    # labels, sizes (int64), centres and variances (5 float32 each), radius (float32)
    assert report.nbytes == ball_bytes(kept) == len(kept) * (8 + 8 + 20 + 20 + 4)
    assert report.as_dict()["per_class_found"] == {
        "0": report.per_class_found[0],
        "1": report.per_class_found[1],
    }


def test_most_samples_in_a_few_balls_is_flagged_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tight crowd plus 19 far groups leaves one ball with most samples."""
    rng = np.random.default_rng(0)
    crowd = rng.normal(0.0, 0.01, size=(900, 4))
    far = rng.normal(0.0, 0.01, size=(95, 4)) + np.repeat(
        rng.normal(0.0, 50.0, size=(19, 4)), 5, axis=0
    )
    x = np.concatenate([crowd, far]).astype(np.float32)
    y = np.zeros(995, np.int64)

    with caplog.at_level(logging.WARNING, logger="grbfl.balls"):
        _, _, report = build_balls(x, y, 1, BallSettings(n_clusters=20, min_size=5))

    assert report.degenerate
    assert any("degenerate" in record.getMessage() for record in caplog.records)


def test_outliers_are_folded_into_balls_that_can_be_shared() -> None:
    """k-means leaves outliers alone; min_size makes every cluster shareable."""
    rng = np.random.default_rng(1)
    crowd = rng.normal(0.0, 1.0, size=(400, 8))
    outliers = rng.normal(0.0, 30.0, size=(40, 8))
    x = np.concatenate([crowd, outliers]).astype(np.float32)
    y = np.zeros(440, np.int64)

    loose, _, _ = build_balls(x, y, 1, BallSettings(n_clusters=40, min_size=1))
    found, _, report = build_balls(x, y, 1, BallSettings(n_clusters=40, min_size=5))

    assert int((loose.sizes < 5).sum()) >= 20  # the problem being fixed
    assert int(found.sizes.min()) >= 5
    assert report.too_small == 0
    assert int(found.sizes.sum()) == 440  # nobody dropped
    assert len(found) >= 30  # the largest balls were split to keep the count
    assert int(found.sizes.max()) < 60


def test_even_ball_sizes_are_not_degenerate() -> None:
    """Equal sizes never trip the flag; one ball holding most samples does."""
    assert not is_degenerate(np.full(20, 50))
    assert is_degenerate(np.array([500] + [10] * 19))


def test_settings_reject_values_that_cannot_work() -> None:
    """Nonsense settings fail at construction with the field named."""
    with pytest.raises(ValueError, match="n_clusters"):
        BallSettings(n_clusters=0)
    with pytest.raises(ValueError, match="min_size"):
        BallSettings(min_size=0)
    with pytest.raises(ValueError, match="variance_threshold"):
        BallSettings(variance_threshold=-0.1)


# -- merging -------------------------------------------------------------------------


def test_merged_statistics_equal_those_of_the_union_of_members() -> None:
    """Pooled size, mean, population variance match a direct computation."""
    rng = np.random.default_rng(1)
    parts = [rng.normal(0.1 * i, 1.0, size=(n, 16)) for i, n in enumerate((7, 12, 30))]
    balls = BallSet.concat([_ball_of(m, 0, owner) for owner, m in enumerate(parts)])

    merged, stats = merge_balls(balls, closeness=2.0)

    union = np.concatenate(parts)
    assert stats.after == 1
    assert merged.owners.tolist() == [-1]
    assert merged.sizes.tolist() == [49]
    np.testing.assert_allclose(merged.centers[0], union.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(merged.variances[0], union.var(axis=0), rtol=1e-4)


@pytest.mark.parametrize("outlier_owner", [0, 1, 2, 3])
def test_merged_radius_covers_every_member(outlier_owner: int) -> None:
    """Members far out in one ball stay inside the merged ball's radius."""
    rng = np.random.default_rng(2)
    parts = [rng.normal(0.0, 1.0, size=(20, 32)) for _ in range(4)]
    parts[outlier_owner][0] += 25.0  # an outlier that sets its ball's radius
    balls = BallSet.concat([_ball_of(m, 0, owner) for owner, m in enumerate(parts)])

    merged, stats = merge_balls(balls, closeness=2.0)

    union = np.concatenate(parts)
    gap = np.linalg.norm(union - merged.centers[0].astype(np.float64), axis=1)
    assert stats.after == 1
    assert (gap <= merged.radii[0]).all()
    assert gap.max() > 0.9 * merged.radii[0]  # covering, yet not a loose bound


def test_a_ball_that_moved_in_a_merge_is_checked_again_before_its_next_merge() -> None:
    """B-C qualify before A+B merge; the merged centre is then too far from C."""
    balls = BallSet(
        labels=np.zeros(3, np.int64),
        sizes=np.full(3, 10, np.int64),
        centers=np.array([[-0.3], [0.0], [0.45]], np.float32),
        variances=np.ones((3, 1), np.float32),
        radii=np.full(3, 3.0, np.float32),
        owners=np.arange(3, dtype=np.int64),
    )

    merged, _ = merge_balls(balls, closeness=0.5)

    assert sorted(merged.sizes.tolist()) == [10, 20]
    np.testing.assert_allclose(sorted(merged.centers[:, 0]), [-0.15, 0.45], atol=1e-6)


def test_merging_participants_reduces_the_count_without_collapsing_a_class(
    digit_balls: BallSet,
) -> None:
    """Almost all same-class pairs overlap, yet every class keeps several balls."""
    centers = digit_balls.centers.astype(np.float64)
    gaps = np.linalg.norm(centers[:, None] - centers[None], axis=2)
    reach = digit_balls.radii[:, None] + digit_balls.radii[None]
    same_class = (digit_balls.labels[:, None] == digit_balls.labels[None]) & (
        digit_balls.owners[:, None] != digit_balls.owners[None]
    )
    assert (gaps < reach)[same_class].mean() > 0.9  # what "merge overlaps" would do

    merged, stats = merge_balls(digit_balls)

    assert stats.after < 0.8 * stats.before
    per_class = np.bincount(merged.labels, minlength=10)
    for label in range(10):
        most_from_one = max(
            int(((digit_balls.labels == label) & (digit_balls.owners == o)).sum())
            for o in range(3)
        )
        assert per_class[label] >= max(2, most_from_one)
    assert merged.sizes.sum() == digit_balls.sizes.sum()


def test_balls_of_the_same_owner_never_merge() -> None:
    """Two identical balls of one participant stay two balls."""
    rng = np.random.default_rng(3)
    members = rng.normal(size=(10, 8))
    balls = BallSet.concat([_ball_of(members, 0, 5), _ball_of(members, 0, 5)])

    merged, stats = merge_balls(balls, closeness=10.0)

    assert stats.after == 2
    assert merged.owners.tolist() == [5, 5]


def test_a_merged_ball_never_takes_a_second_ball_of_one_owner() -> None:
    """Owner 0's two balls cannot meet through a merge with owner 1's ball."""
    rng = np.random.default_rng(4)
    members = rng.normal(size=(10, 8))
    balls = BallSet.concat(
        [
            _ball_of(members, 0, 0),
            _ball_of(members + 0.01, 0, 0),
            _ball_of(members, 0, 1),
        ]
    )

    merged, stats = merge_balls(balls, closeness=10.0)

    assert stats.after == 2
    assert sorted(merged.sizes.tolist()) == [10, 20]


def test_balls_of_different_classes_never_merge() -> None:
    """Same members, different labels: nothing merges."""
    members = np.random.default_rng(5).normal(size=(10, 8))
    balls = BallSet.concat([_ball_of(members, 0, 0), _ball_of(members, 1, 1)])

    merged, stats = merge_balls(balls, closeness=10.0)

    assert stats.after == 2
    assert merged.labels.tolist() == [0, 1]


def test_distant_balls_do_not_merge_and_come_out_unchanged() -> None:
    """Balls farther apart than closeness x spread are left bit for bit as they were."""
    rng = np.random.default_rng(6)
    balls = BallSet.concat(
        [_ball_of(rng.normal(10.0 * i, 1.0, size=(9, 8)), 0, i) for i in range(3)]
    )

    merged, stats = merge_balls(balls)

    assert stats.after == 3
    for name, array in balls.to_arrays().items():
        np.testing.assert_array_equal(merged.to_arrays()[name], array, err_msg=name)
    assert merged.owners.tolist() == [0, 1, 2]


def test_max_merged_size_stops_merges_that_would_exceed_it() -> None:
    """With a cap of 25, two balls of 10 merge but a third cannot join."""
    members = np.random.default_rng(7).normal(size=(10, 8))
    balls = BallSet.concat([_ball_of(members + 0.01 * i, 0, i) for i in range(3)])

    merged, _ = merge_balls(balls, closeness=10.0, max_merged_size=25)

    assert sorted(merged.sizes.tolist()) == [10, 20]


def test_cell_search_merges_every_copy_of_well_separated_regions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tiny cells force the pruned search; copies of a region still find each other."""
    monkeypatch.setattr(balls_module, "_CELL_SIZE", 16)
    rng = np.random.default_rng(8)
    regions, owners, dim = 30, 8, 64
    modes = rng.normal(0.0, 10.0, size=(regions, dim))
    sets = []
    for owner in range(owners):
        centers = modes + rng.normal(0.0, 0.05, size=modes.shape)
        sets.append(
            BallSet(
                labels=np.zeros(regions, np.int64),
                sizes=np.full(regions, 10, np.int64),
                centers=centers.astype(np.float32),
                variances=np.ones((regions, dim), np.float32),
                radii=np.full(regions, 20.0, np.float32),
                owners=np.full(regions, owner, np.int64),
            )
        )
    balls = BallSet.concat(sets)

    merged, stats = merge_balls(balls)

    assert stats.after == regions
    assert merged.sizes.tolist() == [10 * owners] * regions


def test_merging_nothing_returns_an_empty_set() -> None:
    """No balls in, no balls out, no error."""
    merged, stats = merge_balls(BallSet.empty(4))

    assert len(merged) == 0
    assert (stats.before, stats.after, stats.merged_pairs) == (0, 0, 0)


# -- sampling ------------------------------------------------------------------------


def test_samples_stay_inside_their_ball_and_the_clip_range() -> None:
    """Every point lies within some ball of its label and inside the clip range."""
    rng = np.random.default_rng(9)
    balls = BallSet.concat(
        [
            _ball_of(rng.uniform(0.2 + 0.3 * i, 0.5 + 0.3 * i, size=(12, 6)), i, 0)
            for i in range(2)
        ]
    )

    points, labels = sample_balls(balls, 2000, rng, clip=(0.0, 1.0), scale=3.0)

    assert points.dtype == np.float32 and labels.dtype == np.int64
    assert points.min() >= 0.0 and points.max() <= 1.0
    for label in (0, 1):
        mine = points[labels == label]
        gap = np.linalg.norm(mine - balls.centers[label], axis=1)
        assert (gap <= balls.radii[label] * (1 + 1e-5)).all()


def test_balanced_sampling_gives_every_class_an_equal_share() -> None:
    """One class with ten times the members still gets half of the points."""
    rng = np.random.default_rng(10)
    balls = BallSet.concat(
        [
            _ball_of(rng.normal(size=(100, 4)), 0, 0),
            _ball_of(rng.normal(size=(10, 4)), 1, 0),
        ]
    )

    _, balanced = sample_balls(balls, 1001, np.random.default_rng(0))
    _, by_size = sample_balls(balls, 1100, np.random.default_rng(0), balanced=False)

    assert sorted(np.bincount(balanced).tolist()) == [500, 501]
    assert np.bincount(by_size)[0] > 900


def test_samples_follow_the_ball_variance_times_scale_squared() -> None:
    """With a wide radius the draws keep each dimension's variance."""
    balls = BallSet(
        labels=np.array([0], np.int64),
        sizes=np.array([50], np.int64),
        centers=np.zeros((1, 3), np.float32),
        variances=np.array([[1.0, 4.0, 0.25]], np.float32),
        radii=np.array([100.0], np.float32),
        owners=np.zeros(1, np.int64),
    )

    points, _ = sample_balls(balls, 20000, np.random.default_rng(11), scale=0.5)

    np.testing.assert_allclose(points.var(axis=0), [0.25, 1.0, 0.0625], rtol=0.05)


def test_sampling_with_equal_generators_repeats_the_draw() -> None:
    """The generator is the only source of randomness."""
    members = np.random.default_rng(12).normal(size=(10, 5))
    balls = BallSet.concat([_ball_of(members, 0, 0), _ball_of(members + 1, 1, 0)])

    first = sample_balls(balls, 50, np.random.default_rng(5))
    second = sample_balls(balls, 50, np.random.default_rng(5))

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


# -- wire ----------------------------------------------------------------------------


def _wire_arrays(count: int = 3, dim: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(13)
    return {
        "labels": np.arange(count, dtype=np.int64),
        "sizes": np.full(count, 6, np.int64),
        "centers": rng.normal(size=(count, dim)).astype(np.float32),
        "variances": rng.uniform(0.1, 1.0, size=(count, dim)).astype(np.float32),
        "radii": np.full(count, 3.0, np.float32),
    }


def test_arrays_round_trip_through_the_wire_form() -> None:
    """from_arrays(to_arrays()) restores every array and sets the owner."""
    arrays = _wire_arrays()

    balls = BallSet.from_arrays(arrays, owner=4, dim=4, num_classes=3)

    for name, array in balls.to_arrays().items():
        np.testing.assert_array_equal(array, arrays[name])
    assert balls.owners.tolist() == [4, 4, 4]


def _corrupt(field: str, value: np.ndarray) -> dict[str, np.ndarray]:
    arrays = _wire_arrays()
    arrays[field] = value
    return arrays


@pytest.mark.parametrize(
    ("arrays", "field"),
    [
        (_corrupt("centers", np.full((3, 4), np.nan, np.float32)), "centers"),
        (_corrupt("variances", np.full((3, 4), np.inf, np.float32)), "variances"),
        (_corrupt("radii", np.array([1.0, np.nan, 1.0], np.float32)), "radii"),
        (_corrupt("centers", np.zeros(12, np.float32)), "centers"),
        (_corrupt("variances", np.ones((3, 5), np.float32)), "variances"),
        (_corrupt("radii", np.ones(2, np.float32)), "radii"),
        (_corrupt("variances", np.full((3, 4), -0.5, np.float32)), "variances"),
        (_corrupt("sizes", np.array([6, 0, 6], np.int64)), "sizes"),
        (_corrupt("sizes", np.array([6.0, 6.0, 6.0])), "sizes"),
        (_corrupt("labels", np.array([0, 1, 7], np.int64)), "labels"),
        ({k: v for k, v in _wire_arrays().items() if k != "radii"}, "radii"),
        (_corrupt("radii", np.array([2.0, 0.1, 2.0], np.float32)), "radii"),
    ],
    ids=[
        "nan-centre",
        "inf-variance",
        "nan-radius",
        "flat-centres",
        "variance-width",
        "short-radii",
        "negative-variance",
        "zero-size",
        "float-sizes",
        "label-out-of-range",
        "missing-radii",
        "radius-inside-spread",
    ],
)
def test_from_arrays_rejects_malformed_balls_naming_the_field(
    arrays: dict[str, np.ndarray], field: str
) -> None:
    """Whatever a participant sends, bad balls raise WireError, never ValueError."""
    with pytest.raises(WireError, match=field):
        BallSet.from_arrays(arrays, owner=0, dim=4, num_classes=3)


def test_concat_keeps_order_and_owners() -> None:
    """Concatenated sets list their balls in the order given, owners intact."""
    first = BallSet.from_arrays(_wire_arrays(2), owner=0)
    second = BallSet.from_arrays(_wire_arrays(3), owner=1)

    both = BallSet.concat([first, BallSet.empty(7), second])

    assert both.owners.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(both.centers[2:], second.centers)
