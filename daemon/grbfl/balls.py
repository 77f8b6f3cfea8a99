"""Granular balls: found on a participant, merged on the aggregator, sampled from.

A granular ball summarises at least ``min_size`` local samples of one class by their
count, mean (the centre), per-dimension population variance and radius (the largest
distance of a member from the centre). Balls are the only thing the ``balls`` strategy
lets leave a device, and half of what the ``grbfl`` strategy sends.

Finding balls (participant)
---------------------------
Each class gets a share of ``n_clusters`` proportional to its sample count (largest
remainder rounding, at least one ball for a non-empty class), capped so that every ball
could hold ``min_size`` samples and so that there are no more balls than distinct
samples. Each class is clustered by k-means++ followed by Lloyd iterations
(scikit-learn ``KMeans``, one seeded start per class), which is deterministic for the
same data and settings. A ball is shared (kept) only when it has at least ``min_size``
members, its mean per-dimension variance exceeds ``variance_threshold``, and its float32
centre is not bit-for-bit one of its members.

Merging balls (aggregator)
--------------------------
Two balls may merge only when all of these hold:

* they carry the same label;
* they come from disjoint sets of participants (a participant's own balls never merge
  with each other, directly or through an earlier merge);
* their centres are closer than ``closeness`` times the smaller of their two spreads,
  where a ball's spread is its RMS member distance ``sqrt(sum(variance))``;
* the merged size stays within ``max_merged_size`` when one is given.

Balls merge two at a time and the pooled statistics are recomputed after every merge:
a ball merges with its nearest qualifying partner when it is that partner's nearest
qualifying partner too (mutual nearest neighbours), until no qualifying pair is left.
The largest-member-distance overlap test is deliberately not used: in hundreds of
dimensions nearly every pair of same-class balls overlaps by it, so it (or chaining
overlaps) would collapse each class into one ball. Instead, a merged ball's spread is at
most ``sqrt(1 + closeness**2 / 4)`` times the larger of the two spreads, so merged balls
stay local; and since a merged ball holds at most one ball of each participant, a class
keeps at least as many balls as the participant that sent the most balls of it (balls
that arrive with owner -1, already merged elsewhere, have no known participants).

Merged statistics are exact pooled statistics: sizes add, the centre is the
size-weighted mean, the variance is the within-ball part plus the between-centre part,
and the radius ``max(r_i + |c_i - c|)`` covers every member of both balls (widened by
the float32 rounding of the centre).

How the search approximates the rule: comparing every same-class pair is too slow for
hundreds of participants (for 100 x 1,000 balls of 512 dims, the distances alone take
longer than the whole merge), so each pass looks for partners only near each ball. The
centres of a class are projected onto their top principal directions plus one
coordinate holding the norm of the rest, and grouped into cells of about
``_CELL_SIZE`` balls; a ball's candidates are its ``_EDGES_PER_BALL`` nearest
qualifying partners, by true distance, in the ``_CELL_PROBES`` cells nearest its own.
The merges of a pass then happen in rounds, ranking candidates by their distance at the
start of the pass (a ball that absorbs another inherits its candidates). Every merge is
checked against the rule with current statistics before it is made, so no merge ever
breaks the rule. Two things can differ from merging strictly by current nearest
neighbours: a nearer qualifying partner outside a ball's candidates is missed, and a
ball that already merged in a pass ranks its next partners by the distances from the
start of the pass. Distances in the projected space never exceed true ones, which can
prove that a search missed nothing; ``MergeStats.unverified`` counts the ball searches
(summed over passes) where it could not, so 0 means every ball saw its nearest
qualifying partner at the start of every pass.

Classes never merge with each other, so each class is merged in a worker thread of
its own, one per usable core; numpy releases the GIL in the products and sorts that
dominate, and each thread keeps its BLAS to one thread (its products are small, and
BLAS threads on top of worker threads only contend for the same cores). The merge of
each class is unchanged by this, so the result does not depend on the thread count.

Sampling (aggregator)
---------------------
Synthetic points are drawn class-balanced, then in proportion to ball size within a
class, from a Gaussian with the ball's per-dimension variance, pulled back inside the
ball's radius and optionally clipped. Embedding balls come with class shapes
(``shapes`` module) that correlate the dimensions of a class's samples.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from grbfl.errors import DataError, WireError
from grbfl.shapes import ClassShapes

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Bumped whenever finding balls changes, so that balls cached on a participant under
# older rules are found again.
ALGORITHM_VERSION = 2

# One k-means++ start per class: on CIFAR-10 pixels (1,667 samples of 3,072 dims, 10
# or 30 clusters) three starts cost 2 to 3 times as much and lower the inertia by 0 to
# 1.2%.
KMEANS_N_INIT = 1

# A clustering is degenerate when the largest tenth of its balls holds more than half
# of the samples; with fewer than ten balls a tenth is not a meaningful group.
DEGENERATE_TOP_SHARE = 0.1
DEGENERATE_SAMPLE_SHARE = 0.5
DEGENERATE_MIN_BALLS = 10

# Candidate search for merging. Centres are projected onto this many principal
# directions (plus the norm of the rest) to form cells; cells of about _CELL_SIZE balls
# keep each block of exact distances small, and probing a cell's _CELL_PROBES nearest
# cells catches partners across cell borders. _CELL_STEPS Lloyd steps are enough for
# cells whose only job is locality.
_PROJECTION_DIMS = 16
_CELL_SIZE = 128
_CELL_PROBES = 4
_CELL_STEPS = 4

# A pass keeps each ball's nearest qualifying partners as candidates (a ball rarely
# needs more than a few) and merges in rounds, about one round per ball that a merged
# ball absorbs; after _MATCH_ROUNDS rounds the next pass starts from fresh candidates.
_EDGES_PER_BALL = 8
_MATCH_ROUNDS = 512

# A safety stop for passes; the benchmarks' merges settle in 2 or 3.
_MAX_PASSES = 32

# Slack on the lower bound against float rounding, relative to the spread of the
# points, far below any distance that matters.
_BOUND_SLACK = 1e-6

# Relative slack when checking received radii against variances (float32 sums).
_RADIUS_SLACK = 1e-3

# Rows drawn at once when sampling (bounds the temporary arrays to rows x dims).
_SAMPLE_CHUNK = 8192

_WIRE_FIELDS = ("labels", "sizes", "centers", "variances", "radii")


@dataclass(frozen=True)
class BallSettings:
    """How a participant turns its samples into balls."""

    n_clusters: int = 100
    variance_threshold: float = 0.03
    min_size: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be at least 1, got {self.n_clusters}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be at least 1, got {self.min_size}")
        if not math.isfinite(self.variance_threshold) or self.variance_threshold < 0:
            raise ValueError(
                "variance_threshold must be a finite number >= 0, "
                f"got {self.variance_threshold}"
            )


@dataclass(eq=False)  # arrays have no single truth value to compare by
class BallSet:
    """All balls of one participant, or of a merged set, as parallel arrays."""

    labels: IntArray
    sizes: IntArray
    centers: FloatArray
    variances: FloatArray
    radii: FloatArray
    owners: IntArray

    def __post_init__(self) -> None:
        count = self.labels.shape[0]
        lengths = {
            name: getattr(self, name).shape[0] for name in (*_WIRE_FIELDS, "owners")
        }
        if any(length != count for length in lengths.values()):
            raise ValueError(f"ball arrays differ in length: {lengths}")
        if self.centers.ndim != 2 or self.centers.shape != self.variances.shape:
            raise ValueError(
                f"centers {self.centers.shape} and variances {self.variances.shape} "
                "must be the same (balls, dims) shape"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        """Dimensions of the space the balls live in."""
        return int(self.centers.shape[1])

    @classmethod
    def empty(cls, dim: int) -> BallSet:
        """A set with no balls in a space of ``dim`` dimensions."""
        return cls(
            labels=np.zeros(0, np.int64),
            sizes=np.zeros(0, np.int64),
            centers=np.zeros((0, dim), np.float32),
            variances=np.zeros((0, dim), np.float32),
            radii=np.zeros(0, np.float32),
            owners=np.zeros(0, np.int64),
        )

    def subset(self, index: npt.ArrayLike) -> BallSet:
        """The balls picked by a boolean mask or an index array, in that order."""
        pick = np.asarray(index)
        return BallSet(
            labels=self.labels[pick],
            sizes=self.sizes[pick],
            centers=self.centers[pick],
            variances=self.variances[pick],
            radii=self.radii[pick],
            owners=self.owners[pick],
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that go on the wire (owners stay with the receiver)."""
        return {name: getattr(self, name) for name in _WIRE_FIELDS}

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        owner: int,
        *,
        dim: int | None = None,
        num_classes: int | None = None,
    ) -> BallSet:
        """Validate balls received from the wire; raise WireError naming the field.

        Integer fields must have an integer dtype and float fields a floating dtype;
        they are converted to int64 and float32. ``dim`` and ``num_classes``, when
        given, also pin the centre width and the label range.
        """
        if not isinstance(arrays, dict):
            raise WireError(f"balls must be a mapping of arrays, got {type(arrays)}")
        for name in _WIRE_FIELDS:
            if name not in arrays:
                raise WireError(f"balls field {name!r} is missing")
            if not isinstance(arrays[name], np.ndarray):
                raise WireError(
                    f"balls field {name!r} must be an array, got {type(arrays[name])}"
                )

        labels = _wire_ints(arrays["labels"], "labels")
        sizes = _wire_ints(arrays["sizes"], "sizes")
        centers = _wire_floats(arrays["centers"], "centers", ndim=2)
        variances = _wire_floats(arrays["variances"], "variances", ndim=2)
        radii = _wire_floats(arrays["radii"], "radii", ndim=1)

        # Shapes must agree with one another (and with the expected width).
        count = labels.shape[0]
        for name, array in (
            ("sizes", sizes),
            ("centers", centers),
            ("variances", variances),
            ("radii", radii),
        ):
            if array.shape[0] != count:
                raise WireError(
                    f"balls field {name!r} has {array.shape[0]} rows, "
                    f"labels has {count}"
                )
        if variances.shape != centers.shape:
            raise WireError(
                f"balls field 'variances' has shape {variances.shape}, "
                f"centers has {centers.shape}"
            )
        if dim is not None and centers.shape[1] != dim:
            raise WireError(
                f"balls field 'centers' has {centers.shape[1]} dims, expected {dim}"
            )
        if count and centers.shape[1] == 0:
            raise WireError("balls field 'centers' has zero dims")

        # Values must make sense as statistics.
        if (sizes <= 0).any():
            raise WireError("balls field 'sizes' holds a size <= 0")
        if (labels < 0).any() or (
            num_classes is not None and (labels >= num_classes).any()
        ):
            raise WireError(
                f"balls field 'labels' holds a label outside [0, {num_classes})"
            )
        if (variances < 0).any():
            raise WireError("balls field 'variances' holds a negative variance")
        if (radii < 0).any():
            raise WireError("balls field 'radii' holds a negative radius")
        # The farthest member is at least as far as the RMS distance the variances
        # imply; the slack covers float32 rounding.
        spread = np.sqrt(variances.sum(axis=1, dtype=np.float64))
        if (radii * (1 + _RADIUS_SLACK) + _RADIUS_SLACK < spread).any():
            raise WireError(
                "balls field 'radii' holds a radius below the spread of its variances"
            )

        return cls(
            labels=labels,
            sizes=sizes,
            centers=centers,
            variances=variances,
            radii=radii,
            owners=np.full(count, owner, np.int64),
        )

    @staticmethod
    def concat(sets: list[BallSet]) -> BallSet:
        """All balls of several sets in order; empty sets may have any width."""
        filled = [balls for balls in sets if len(balls)]
        if not filled:
            return BallSet.empty(sets[0].dim if sets else 0)
        dims = {balls.dim for balls in filled}
        if len(dims) > 1:
            raise ValueError(
                f"cannot concatenate balls of different widths {sorted(dims)}"
            )
        return BallSet(
            labels=np.concatenate([b.labels for b in filled]),
            sizes=np.concatenate([b.sizes for b in filled]),
            centers=np.concatenate([b.centers for b in filled]),
            variances=np.concatenate([b.variances for b in filled]),
            radii=np.concatenate([b.radii for b in filled]),
            owners=np.concatenate([b.owners for b in filled]),
        )


@dataclass(frozen=True)
class BallReport:
    """What a participant's balls look like and how much of them it shares."""

    per_class_found: dict[int, int]
    per_class_kept: dict[int, int]
    found: int
    kept: int
    share_kept: float
    size_min: int
    size_median: float
    size_max: int
    degenerate: bool
    nbytes: int
    too_small: int = 0  # found balls left home for having fewer than min_size members

    def as_dict(self) -> dict:
        """The report with JSON-friendly keys and values."""
        return {
            "per_class_found": {str(k): v for k, v in self.per_class_found.items()},
            "per_class_kept": {str(k): v for k, v in self.per_class_kept.items()},
            "found": self.found,
            "kept": self.kept,
            "share_kept": self.share_kept,
            "size_min": self.size_min,
            "size_median": self.size_median,
            "size_max": self.size_max,
            "degenerate": self.degenerate,
            "nbytes": self.nbytes,
            "too_small": self.too_small,
        }


@dataclass(frozen=True)
class MergeStats:
    """How a merge went: counts, pairwise merges done, wall time.

    ``passes`` is the largest number of merging passes any class needed; ``unverified``
    counts ball searches (over all passes) that could not prove they saw every
    qualifying partner, see the module docstring.
    """

    before: int
    after: int
    merged_pairs: int
    seconds: float
    passes: int = 0
    unverified: int = 0


def ball_bytes(balls: BallSet) -> int:
    """Bytes of the arrays that go on the wire for these balls."""
    return sum(int(array.nbytes) for array in balls.to_arrays().values())


def build_balls(
    x: np.ndarray, y: np.ndarray, num_classes: int, settings: BallSettings
) -> tuple[BallSet, BallSet, BallReport]:
    """Cluster each class into balls; return all balls, the kept ones and a report."""
    found, exposes_sample = find_balls(x, y, num_classes, settings)
    kept, report = select_balls(
        found, num_classes, settings, exposes_sample=exposes_sample
    )
    return found, kept, report


def find_balls(
    x: np.ndarray, y: np.ndarray, num_classes: int, settings: BallSettings
) -> tuple[BallSet, BoolArray]:
    """Cluster each class into balls, before any is filtered out.

    Returns the balls (owner 0) and a mask of balls whose float32 centre equals one of
    their members; those must never be shared. Split from ``select_balls`` so that a
    sweep over variance thresholds clusters only once.
    """
    found, exposes_sample, _ = find_ball_members(x, y, num_classes, settings)
    return found, exposes_sample


def find_ball_members(
    x: np.ndarray, y: np.ndarray, num_classes: int, settings: BallSettings
) -> tuple[BallSet, BoolArray, IntArray]:
    """``find_balls``, plus the ball (a row of the returned set) of every sample."""
    started = time.perf_counter()
    x, y = _check_samples(x, y, num_classes)
    counts = np.bincount(y, minlength=num_classes)
    wanted = class_ball_counts(counts, settings)

    # Cluster class by class; each class has its own seed derived from the settings.
    parts: list[BallSet] = []
    exposes: list[BoolArray] = []
    member_ball = np.full(y.shape[0], -1, np.int64)
    offset = 0
    for label in np.flatnonzero(wanted):
        rows = np.flatnonzero(y == label)
        members = x[rows]
        seed = int(
            np.random.SeedSequence([settings.seed, int(label)]).generate_state(1)[0]
        )
        assignment = _cluster(members, int(wanted[label]), seed, settings.min_size)
        balls, exposed = _ball_stats(members, assignment, int(label))
        parts.append(balls)
        exposes.append(exposed)

        # _ball_stats numbers the non-empty clusters in order of their ids.
        used = np.bincount(assignment) > 0
        member_ball[rows] = offset + (np.cumsum(used) - 1)[assignment]
        offset += len(balls)
    found = BallSet.concat(parts) if parts else BallSet.empty(x.shape[1])
    exposes_sample = np.concatenate(exposes) if exposes else np.zeros(0, np.bool_)

    # The size distribution is the first thing to look at when accuracy is poor.
    sizes = found.sizes
    log.info(
        "found %d balls for %d samples in %.1f s: sizes min %d, median %.1f, max %d",
        len(found),
        x.shape[0],
        time.perf_counter() - started,
        int(sizes.min()) if len(sizes) else 0,
        float(np.median(sizes)) if len(sizes) else 0.0,
        int(sizes.max()) if len(sizes) else 0,
    )
    if is_degenerate(sizes):
        top = _top_count(len(sizes))
        log.warning(
            "degenerate clustering: the largest %d of %d balls hold %.0f%% of samples",
            top,
            len(sizes),
            100.0 * np.sort(sizes)[::-1][:top].sum() / sizes.sum(),
        )
    return found, exposes_sample, member_ball


def select_balls(
    found: BallSet,
    num_classes: int,
    settings: BallSettings,
    *,
    exposes_sample: BoolArray | None = None,
) -> tuple[BallSet, BallReport]:
    """Keep the balls that may be shared and report on the whole set."""
    kept = found.subset(shareable(found, settings, exposes_sample))

    sizes = found.sizes
    per_found = np.bincount(found.labels, minlength=num_classes)
    per_kept = np.bincount(kept.labels, minlength=num_classes)
    report = BallReport(
        per_class_found={c: int(per_found[c]) for c in range(num_classes)},
        per_class_kept={c: int(per_kept[c]) for c in range(num_classes)},
        found=len(found),
        kept=len(kept),
        share_kept=len(kept) / len(found) if len(found) else 0.0,
        size_min=int(sizes.min()) if len(sizes) else 0,
        size_median=float(np.median(sizes)) if len(sizes) else 0.0,
        size_max=int(sizes.max()) if len(sizes) else 0,
        degenerate=is_degenerate(sizes),
        nbytes=ball_bytes(kept),
        too_small=int((sizes < settings.min_size).sum()),
    )
    return kept, report


def shareable(
    found: BallSet, settings: BallSettings, exposes_sample: BoolArray | None = None
) -> BoolArray:
    """Which balls may leave the device: large and spread enough, no member shown."""
    keep = (found.sizes >= settings.min_size) & (
        found.variances.mean(axis=1, dtype=np.float64) > settings.variance_threshold
    )
    if exposes_sample is not None:
        keep &= ~exposes_sample
    return keep


def class_ball_counts(counts: np.ndarray, settings: BallSettings) -> IntArray:
    """Balls wanted per class: a share of n_clusters, capped by min_size.

    Largest-remainder rounding makes the shares add up to ``n_clusters`` before the
    caps; a non-empty class gets at least one ball, and never more than
    ``count // min_size`` unless that is zero (its one ball is then too small to keep).
    """
    counts = np.asarray(counts, dtype=np.int64)
    wanted = np.zeros(counts.shape[0], np.int64)
    total = int(counts.sum())
    if total == 0:
        return wanted

    # Largest remainder: floor every quota, then hand out what is left by fraction.
    quota = settings.n_clusters * counts / total
    wanted = np.floor(quota).astype(np.int64)
    left = settings.n_clusters - int(wanted.sum())
    order = np.lexsort((np.arange(counts.shape[0]), -(quota - wanted)))
    wanted[order[:left]] += 1

    nonempty = counts > 0
    cap = np.maximum(counts // settings.min_size, 1)
    return np.where(nonempty, np.minimum(np.maximum(wanted, 1), cap), 0)


def is_degenerate(sizes: np.ndarray) -> bool:
    """Whether the largest tenth of the balls holds more than half of the samples."""
    if len(sizes) < DEGENERATE_MIN_BALLS:
        return False
    top = np.sort(np.asarray(sizes))[::-1][: _top_count(len(sizes))]
    return bool(top.sum() > DEGENERATE_SAMPLE_SHARE * np.sum(sizes))


def _top_count(count: int) -> int:
    return max(1, math.ceil(DEGENERATE_TOP_SHARE * count))


def merge_balls(
    balls: BallSet, *, max_merged_size: int | None = None, closeness: float = 0.5
) -> tuple[BallSet, MergeStats]:
    """Merge same-class balls of different owners that describe the same region.

    See the module docstring for the rule. Merged balls have owner -1; untouched balls
    keep theirs. Balls come out grouped by label in ascending order.
    """
    started = time.perf_counter()
    if not closeness > 0:
        raise ValueError(f"closeness must be > 0, got {closeness}")
    if max_merged_size is not None and max_merged_size < 1:
        raise ValueError(f"max_merged_size must be at least 1, got {max_merged_size}")
    if len(balls) == 0:
        return balls.subset(np.arange(0)), MergeStats(0, 0, 0, 0.0)
    cap = max_merged_size if max_merged_size is not None else np.iinfo(np.int64).max

    # Owners become bits so that "no participant in common" is one AND per pair.
    bits = _owner_bits(balls.owners)
    rows_of = {
        int(label): np.flatnonzero(balls.labels == label)
        for label in np.unique(balls.labels)
    }

    def merge_class(label: int) -> _MergeGroup:
        # Copying a class out in float64 costs as much as merging it: in the worker.
        rows = rows_of[label]
        group = _MergeGroup(balls.subset(rows), bits[rows])
        group.run(closeness, cap)
        return group

    # Classes are independent: one worker thread per usable core, largest first.
    largest_first = sorted(rows_of, key=lambda label: -len(rows_of[label]))
    workers = min(len(rows_of), _usable_cores())
    with threadpool_limits(limits=1, user_api="blas"):
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
                merged_groups = pool.map(merge_class, largest_first)
                done = dict(zip(largest_first, merged_groups, strict=True))
        else:
            done = {label: merge_class(label) for label in largest_first}
    groups = {label: done[label] for label in sorted(done)}
    merged = BallSet.concat([group.result(label) for label, group in groups.items()])
    passes = max(group.passes for group in groups.values())
    unverified = sum(group.unverified for group in groups.values())

    stats = MergeStats(
        before=len(balls),
        after=len(merged),
        merged_pairs=len(balls) - len(merged),
        seconds=time.perf_counter() - started,
        passes=passes,
        unverified=unverified,
    )
    log.debug(
        "merged %d balls into %d in %d passes, %.3f s (%d unverified searches)",
        stats.before,
        stats.after,
        stats.passes,
        stats.seconds,
        stats.unverified,
    )
    return merged, stats


def sample_balls(
    balls: BallSet,
    n: int,
    rng: np.random.Generator,
    *,
    clip: tuple[float, float] | None = None,
    scale: float = 1.0,
    balanced: bool = True,
    shapes: ClassShapes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` synthetic points and their labels from the balls.

    With ``balanced`` (the default) every class present gets an equal share of the
    points, and within a class balls are chosen in proportion to their size. The
    variance filter drops balls unevenly across classes: on CIFAR-10 pixels at
    threshold 0.03, deer kept 3% of the shared samples and trucks 13%. Drawn in
    proportion to size, a ridge classifier trained on the samples recalled no deer at
    all (birds 21%, frogs 22%); drawn balanced it recalled 10%, 35% and 43%, at the same
    overall accuracy. With ``balanced=False`` balls are chosen in proportion to size
    over all classes.

    Each point is Gaussian around the ball's centre with the ball's per-dimension
    variance times ``scale**2``, pulled radially back onto the ball when it falls
    outside the radius, then clipped to ``clip``. Clipping cannot push a point out of
    the ball when the centre lies inside the clip range, as it does for balls of
    clipped data.

    With ``shapes``, a point of a class that has one moves along the class's
    directions together, at the class's scale (``shapes`` module), and on each
    dimension by whatever of the ball's own variance those directions leave
    unexplained. A ball tighter than its class's shape therefore spreads like its
    class, up to its radius: the shape is measured over all of the class's balls,
    and scaling it down to each ball's variance trained a worse head in a
    development run (0.7468 against 0.7583 unscaled, on the setting the ``shapes``
    module describes).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if n > 0 and len(balls) == 0:
        raise ValueError("cannot sample from an empty ball set")
    dim = balls.dim

    # Pick a ball for every point.
    weights = balls.sizes.astype(np.float64)
    if balanced:
        classes = np.unique(balls.labels)
        share = np.full(classes.shape[0], n // max(classes.shape[0], 1), np.int64)
        share[rng.permutation(classes.shape[0])[: n - int(share.sum())]] += 1
        picks = []
        for label, count in zip(classes, share, strict=True):
            rows = np.flatnonzero(balls.labels == label)
            picks.append(
                rng.choice(rows, size=int(count), p=weights[rows] / weights[rows].sum())
            )
        pick = (
            rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
        )
    else:
        pick = rng.choice(len(balls), size=n, p=weights / weights.sum())

    # Draw in chunks to keep temporaries at chunk x dims.
    out = np.empty((n, dim), np.float32)
    variances = balls.variances
    shaped: list[tuple[int, FloatArray]] = []
    if shapes is not None and len(shapes):
        if shapes.axes.shape[2] != dim:
            raise ValueError(f"shapes have {shapes.axes.shape[2]} dims, balls {dim}")
        variances = variances.copy()
        explained = shapes.variances()
        for label, axes, covered in zip(
            shapes.labels, shapes.axes, explained, strict=True
        ):
            of_class = balls.labels == label
            variances[of_class] = np.maximum(variances[of_class] - covered, 0.0)
            shaped.append((int(label), axes * np.float32(scale)))
    std = np.sqrt(variances) * np.float32(scale)
    for start in range(0, n, _SAMPLE_CHUNK):
        rows = pick[start : start + _SAMPLE_CHUNK]
        noise = rng.standard_normal((rows.shape[0], dim), dtype=np.float32)
        noise *= std[rows]
        for label, axes in shaped:
            along = np.flatnonzero(balls.labels[rows] == label)
            coords = rng.standard_normal((along.shape[0], axes.shape[0]), np.float32)
            noise[along] += coords @ axes
        length = np.linalg.norm(noise, axis=1)
        limit = balls.radii[rows]
        outside = length > limit
        noise[outside] *= (limit[outside] / length[outside])[:, None]
        noise += balls.centers[rows]
        out[start : start + rows.shape[0]] = noise
    if clip is not None:
        np.clip(out, clip[0], clip[1], out=out)
    return out, balls.labels[pick].astype(np.int64)


# -- finding -------------------------------------------------------------------------


def _check_samples(
    x: np.ndarray, y: np.ndarray, num_classes: int
) -> tuple[FloatArray, IntArray]:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[1] < 1:
        raise ValueError(f"need x (N, D >= 1) and y (N,), got {x.shape} and {y.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}"
        )
    if not np.isfinite(x).all():
        raise DataError("samples hold NaN or infinite values")
    return x, y


def _cluster(
    members: FloatArray, wanted: int, seed: int, min_size: int = 1
) -> IntArray:
    """Assign each member to one of at most ``wanted`` clusters, each of at least
    ``min_size`` members when the class has that many."""
    # k-means cannot find more clusters than distinct points (it would warn and leave
    # some empty), so duplicates lower the count.
    clusters = min(wanted, _distinct_rows(members))
    if clusters <= 1:
        return np.zeros(members.shape[0], np.int64)
    model = KMeans(
        n_clusters=clusters, init="k-means++", n_init=KMEANS_N_INIT, random_state=seed
    )
    assignment = model.fit_predict(members).astype(np.int64)
    if min_size > 1:
        assignment = _fill_small_clusters(members, assignment, min_size)
    return assignment


def _fill_small_clusters(
    members: FloatArray, assignment: IntArray, min_size: int
) -> IntArray:
    """Dissolve clusters below ``min_size`` and split the largest to keep the count.

    In pixel space k-means leaves many outliers alone: on CIFAR-10 with about six
    samples per cluster, half the clusters held one or two images and could never be
    shared, while a few held seventy. Each undersized cluster, smallest first, gives
    its members to the nearest other centres; the largest cluster is then cut in two
    at the median of its principal direction when it holds ``2 * min_size`` or more
    (2-means often splits off a few outliers instead and fails the size). Receivers
    only grow and halves start at ``min_size``, so every step removes one undersized
    cluster.
    """
    count = int(assignment.max()) + 1
    sizes = np.bincount(assignment, minlength=count)
    if not ((sizes > 0) & (sizes < min_size)).any():
        return assignment  # the usual case with a few hundred samples per ball
    assignment = assignment.copy()
    points = members.astype(np.float64)
    sums = _cluster_sums(points, assignment, count)
    while True:
        live = sizes > 0
        small = np.flatnonzero(live & (sizes < min_size))
        others = np.flatnonzero(live)
        if small.size == 0 or others.size < 2:
            break
        gone = int(small[np.argmin(sizes[small])])
        rows = np.flatnonzero(assignment == gone)
        others = others[others != gone]
        centres = sums[others] / sizes[others, None]
        gaps = ((points[rows, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        for row, to in zip(rows, others[gaps.argmin(axis=1)], strict=True):
            assignment[row] = to
            sizes[to] += 1
            sums[to] += points[row]
        sizes[gone] = 0
        sums[gone] = 0.0

        largest = int(np.argmax(sizes))
        if sizes[largest] < 2 * min_size:
            continue
        rows = np.flatnonzero(assignment == largest)
        moved = rows[_upper_half(points[rows])]
        assignment[moved] = gone
        sizes[gone] = moved.shape[0]
        sizes[largest] -= moved.shape[0]
        sums[gone] = points[moved].sum(axis=0)
        sums[largest] -= sums[gone]
    # Renumber so that labels stay 0..k-1 without gaps.
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)


def _distinct_rows(members: FloatArray) -> int:
    """How many different rows members holds (-0.0 and 0.0 count as equal)."""
    rows = members + np.float32(0)  # turns -0.0 into 0.0
    # A set of the rows' bytes: hashing, with an exact comparison on a collision,
    # is several times cheaper than sorting rows of thousands of columns.
    return len(set(map(bytes, rows)))


def _cluster_sums(
    points: npt.NDArray[np.float64], assignment: IntArray, count: int
) -> npt.NDArray[np.float64]:
    """Per cluster 0..count-1, the sum of its points (zeros for an empty one)."""
    order = np.argsort(assignment, kind="stable")
    sizes = np.bincount(assignment, minlength=count)
    sums = np.zeros((count, points.shape[1]), np.float64)
    filled = np.flatnonzero(sizes)
    starts = np.concatenate(([0], np.cumsum(sizes[filled])[:-1]))
    sums[filled] = np.add.reduceat(points[order], starts, axis=0)
    return sums


def _upper_half(points: npt.NDArray[np.float64]) -> BoolArray:
    """The half of the points above the median along their principal direction."""
    centred = points - points.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    along = centred @ direction
    upper = np.zeros(points.shape[0], np.bool_)
    upper[np.argsort(along, kind="stable")[points.shape[0] // 2 :]] = True
    return upper


def _ball_stats(
    members: FloatArray, assignment: IntArray, label: int
) -> tuple[BallSet, BoolArray]:
    """Exact statistics of each non-empty cluster, and which centre equals a member.

    Everything is measured in float64 from the float32 centre that is sent, so the
    radius covers every member as the receiver sees the ball, and a distance of
    exactly zero means the centre is a member. Ball by ball, so that each float64
    copy stays small enough for the processor's caches.
    """
    order = np.argsort(assignment, kind="stable")
    sizes = np.bincount(assignment)
    sizes = sizes[sizes > 0]
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    count, dim = sizes.shape[0], members.shape[1]
    centers = np.empty((count, dim), np.float32)
    variances = np.empty((count, dim), np.float32)
    radii = np.empty(count, np.float64)
    exposed = np.empty(count, np.bool_)
    for ball in range(count):
        points = members[order[bounds[ball] : bounds[ball + 1]]].astype(np.float64)
        exact = points.mean(axis=0)
        centers[ball] = exact
        sent = centers[ball].astype(np.float64)
        points -= sent
        points *= points
        distances = points.sum(axis=1)
        radii[ball] = np.sqrt(distances.max())
        exposed[ball] = distances.min() == 0
        # Population variance about the exact mean: squares about the sent centre,
        # less the (tiny) offset between the two centres.
        offset = exact - sent
        variances[ball] = np.maximum(points.mean(axis=0) - offset * offset, 0.0)

    balls = BallSet(
        labels=np.full(count, label, np.int64),
        sizes=sizes.astype(np.int64),
        centers=centers,
        variances=variances,
        radii=_round_up(radii),
        owners=np.zeros(count, np.int64),
    )
    return balls, exposed


def _round_up(values: np.ndarray) -> FloatArray:
    """float64 values as float32 no smaller than them."""
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


# -- merging -------------------------------------------------------------------------


def _usable_cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _owner_bits(owners: IntArray) -> npt.NDArray[np.uint64]:
    """One bit per distinct owner; owner -1 (already merged, unknown) sets no bit."""
    known = owners >= 0
    distinct, position = np.unique(owners[known], return_inverse=True)
    words = max(1, math.ceil(distinct.shape[0] / 64))
    bits = np.zeros((owners.shape[0], words), np.uint64)
    rows = np.flatnonzero(known)
    bits[rows, position // 64] = np.left_shift(
        np.uint64(1), (position % 64).astype(np.uint64)
    )
    return bits


class _MergeGroup:
    """The balls of one class while they are being merged, kept in float64."""

    def __init__(self, balls: BallSet, bits: npt.NDArray[np.uint64]) -> None:
        self.sizes = balls.sizes.astype(np.int64)
        self.centers = balls.centers.astype(np.float64)
        # Sums of squared deviations per dimension: they add up exactly when pooling.
        self.squares = balls.variances.astype(np.float64) * self.sizes[:, None]
        # Their per-ball totals (spread squared times size), kept up to date so the
        # rule's check needs no gather of whole rows.
        self.totals = self.squares.sum(axis=1)
        self.radii = balls.radii.astype(np.float64)
        self.bits = bits
        self.owners = balls.owners.copy()
        self.passes = 0
        self.unverified = 0

    def run(self, closeness: float, cap: int) -> None:
        """Merge qualifying pairs, pass after pass, until a pass merges nothing."""
        if len(self.sizes) < 2:
            return
        # The projection and the cells are fixed for the whole merge: merged centres
        # stay near the centres they came from.
        self._basis, self._origin = _principal_basis(self.centers)
        shifted, points = self._project()
        self._cells = _cell_centres(points)
        while len(self.sizes) > 1 and self.passes < _MAX_PASSES:
            spread = np.sqrt(self.totals / self.sizes)
            src, dst, dist = self._qualifying_edges(
                closeness * spread, cap, shifted, points
            )
            gone = self._merge_rounds(src, dst, dist, closeness, cap)
            if not gone.any():
                return
            self._keep(~gone)
            self.passes += 1
            shifted, points = self._project()

    def _merge_rounds(
        self,
        src: IntArray,
        dst: IntArray,
        dist: FloatArray,
        closeness: float,
        cap: int,
    ) -> BoolArray:
        """Merge mutual nearest candidates round after round; return the absorbed.

        Candidates are ranked by their distance at the start of the pass, but every
        pair is checked against the rule with current statistics before it merges. A
        ball that absorbed another inherits its candidates, so one pass can fold many
        balls of one region into one.
        """
        count = len(self.sizes)
        index = np.arange(count)
        gone = np.zeros(count, np.bool_)

        # Both directions of every edge, sorted once by distance (ties by partner).
        u = np.concatenate([src, dst])
        v = np.concatenate([dst, src])
        d = np.concatenate([dist, dist])
        order = np.lexsort((v, d))
        u, v = u[order], v[order]

        for _ in range(_MATCH_ROUNDS):
            live = u != v
            u, v = u[live], v[live]
            if not u.shape[0]:
                break

            # A ball's first edge in distance order points to its nearest candidate.
            head = np.full(count, u.shape[0])
            np.minimum.at(head, u, np.arange(u.shape[0]))
            best = np.where(head < u.shape[0], v[np.minimum(head, u.shape[0] - 1)], -1)
            mutual = (best > index) & (best[np.maximum(best, 0)] == index)
            first = index[mutual]
            if not first.shape[0]:
                break
            second = best[first]

            # Pairs that no longer qualify lose their edge; the others merge.
            ok, delta, distance = self._qualifies(first, second, closeness, cap)
            other = np.full(count, -1)
            other[first[~ok]] = second[~ok]
            other[second[~ok]] = first[~ok]
            failed = other[u] == v
            u, v = u[~failed], v[~failed]
            first, second = first[ok], second[ok]
            self._merge(first, second, delta[ok], distance[ok])
            gone[second] = True

            # The survivor of a merge takes over the absorbed ball's candidates.
            into = index.copy()
            into[second] = first
            u, v = into[u], into[v]
        return gone

    def _qualifies(
        self, first: IntArray, second: IntArray, closeness: float, cap: int
    ) -> tuple[BoolArray, np.ndarray, np.ndarray]:
        """Whether each pair meets the merge rule, with exact current statistics;
        also the pairs' centre offsets and distances, which a merge reuses."""
        delta = self.centers[second] - self.centers[first]
        distance = np.linalg.norm(delta, axis=1)
        spread = np.sqrt(
            np.minimum(
                self.totals[first] / self.sizes[first],
                self.totals[second] / self.sizes[second],
            )
        )
        disjoint = ~(self.bits[first] & self.bits[second]).any(axis=1)
        small = self.sizes[first] + self.sizes[second] <= cap
        return (distance < closeness * spread) & disjoint & small, delta, distance

    def _keep(self, keep: BoolArray) -> None:
        self.sizes = self.sizes[keep]
        self.centers = self.centers[keep]
        self.squares = self.squares[keep]
        self.totals = self.totals[keep]
        self.radii = self.radii[keep]
        self.bits = self.bits[keep]
        self.owners = self.owners[keep]

    def result(self, label: int) -> BallSet:
        """The merged balls as a float32 set whose radii still cover their members."""
        centers = self.centers.astype(np.float32)
        # Rounding moves the centre a little; widen the radius by as much.
        shift = np.linalg.norm(centers.astype(np.float64) - self.centers, axis=1)
        return BallSet(
            labels=np.full(len(self.sizes), label, np.int64),
            sizes=self.sizes,
            centers=centers,
            variances=(self.squares / self.sizes[:, None]).astype(np.float32),
            radii=_round_up(self.radii + shift),
            owners=self.owners,
        )

    def _merge(
        self,
        first: IntArray,
        second: IntArray,
        delta: np.ndarray,
        distance: np.ndarray,
    ) -> None:
        """Fold each second ball into its first; delta is c_second - c_first."""
        n1 = self.sizes[first].astype(np.float64)
        n2 = self.sizes[second].astype(np.float64)
        total = n1 + n2

        # Pooled statistics: within-ball squares plus the between-centre part.
        center = self.centers[first] + (n2 / total)[:, None] * delta
        squares = (
            self.squares[first]
            + self.squares[second]
            + (n1 * n2 / total)[:, None] * delta * delta
        )
        # Members lie within r_i of c_i, and c_i within |c_i - c| of the new centre.
        radius = np.maximum(
            self.radii[first] + distance * (n2 / total),
            self.radii[second] + distance * (n1 / total),
        )

        self.sizes[first] += self.sizes[second]
        self.centers[first] = center
        self.squares[first] = squares
        self.totals[first] = squares.sum(axis=1)
        self.radii[first] = radius
        self.bits[first] |= self.bits[second]
        self.owners[first] = -1

    def _qualifying_edges(
        self, limit: np.ndarray, cap: int, shifted: np.ndarray, points: np.ndarray
    ) -> tuple[IntArray, IntArray, FloatArray]:
        """Up to ``_EDGES_PER_BALL`` nearest qualifying partners of every ball.

        Distances are exact, but only partners in the cells probed for the ball's own
        cell are looked at; balls for which the lower bound cannot rule out a nearer
        qualifying partner elsewhere are counted in ``unverified``.
        """
        count = len(self.sizes)

        # Put every ball in the cell of its nearest cell centre; a cell reaches as far
        # as its farthest member.
        to_cell = np.sqrt(_squared_distances(points, self._cells))
        cell_of = to_cell.argmin(axis=1)
        reach = np.zeros(self._cells.shape[0])
        np.maximum.at(reach, cell_of, to_cell[np.arange(count), cell_of])
        order = np.argsort(cell_of, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(cell_of, minlength=len(reach))))
        between = _squared_distances(self._cells, self._cells)
        np.fill_diagonal(between, -1.0)  # a cell always probes itself
        probes = np.argsort(between, axis=1, kind="stable")[:, :_CELL_PROBES]

        # Exact distances, one matrix product per cell against its probed cells.
        # Centring first keeps the float32 dot-product form accurate.
        centers = shifted.astype(np.float32)
        norms = np.einsum("ij,ij->i", centers, centers)
        reach2 = (limit * limit).astype(np.float32)
        capped = bool((self.sizes.max() * 2) > cap)
        nearest = np.full(count, np.inf)
        edges: list[tuple[IntArray, IntArray, FloatArray]] = []
        for cell, rows in enumerate(members[: len(reach)]):
            if not rows.shape[0]:
                continue
            cols = np.concatenate([members[probe] for probe in probes[cell]])
            squared = centers[rows] @ centers[cols].T
            squared *= -2
            squared += norms[rows, None]
            squared += norms[None, cols]

            # Everything that does not qualify moves out of reach, then each ball
            # keeps its nearest few qualifying partners. A cell probes itself first,
            # so a ball meets itself on the block's diagonal.
            ok = squared < reach2[rows, None]
            ok &= squared < reach2[None, cols]
            for word in range(self.bits.shape[1]):
                ok &= (self.bits[rows, None, word] & self.bits[None, cols, word]) == 0
            if capped:
                ok &= self.sizes[rows, None] + self.sizes[None, cols] <= cap
            np.copyto(squared, np.float32(np.inf), where=~ok)
            squared[np.arange(rows.shape[0]), np.arange(rows.shape[0])] = np.inf
            keep = min(_EDGES_PER_BALL, cols.shape[0])
            if keep < cols.shape[0]:
                slot = np.argpartition(squared, keep - 1, axis=1)[:, :keep]
            else:
                slot = np.broadcast_to(np.arange(keep), squared.shape)
            picked = np.take_along_axis(squared, slot, axis=1)
            nearest[rows] = np.sqrt(np.maximum(picked.min(axis=1), 0))
            row, rank = np.nonzero(np.isfinite(picked))
            edges.append(
                (
                    rows[row],
                    cols[slot[row, rank]],
                    np.sqrt(np.maximum(picked[row, rank], 0)).astype(np.float32),
                )
            )

        # A ball is verified when no unprobed cell can hold a partner nearer than the
        # one found (or within its limit, if none was found).
        probed = np.zeros((len(reach), len(reach)), np.bool_)
        np.put_along_axis(probed, probes, True, axis=1)
        bound = np.where(probed[cell_of], np.inf, to_cell - reach[None, :])
        slack = _BOUND_SLACK * float(np.abs(points).max(initial=0.0))
        self.unverified += int(
            (bound.min(axis=1) < np.minimum(limit, nearest) - slack).sum()
        )

        if not edges:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0, np.float32)
        return (
            np.concatenate([e[0] for e in edges]),
            np.concatenate([e[1] for e in edges]),
            np.concatenate([e[2] for e in edges]),
        )

    def _project(self) -> tuple[np.ndarray, np.ndarray]:
        """The centres about the origin, and points whose pairwise distances never
        exceed those of the centres.

        The projection onto orthonormal directions shrinks distances, and the norm of
        the remainder differs between two centres by at most the remainder of their
        difference, so appending it keeps the bound.
        """
        shifted = self.centers - self._origin
        projected = shifted @ self._basis
        rest = np.einsum("ij,ij->i", shifted, shifted) - np.einsum(
            "ij,ij->i", projected, projected
        )
        points = np.hstack([projected, np.sqrt(np.maximum(rest, 0.0))[:, None]])
        return shifted, points


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (
        (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2 * (a @ b.T)
    )
    return np.maximum(squared, 0.0)


def _cell_centres(points: np.ndarray) -> np.ndarray:
    """Centres of about ``len / _CELL_SIZE`` cells: a few seeded Lloyd steps."""
    cells = max(1, math.ceil(points.shape[0] / _CELL_SIZE))
    if cells == 1:
        return points.mean(axis=0, keepdims=True)
    rng = np.random.default_rng(0)
    centres = points[rng.choice(points.shape[0], size=cells, replace=False)]
    for _ in range(_CELL_STEPS):
        nearest = _squared_distances(points, centres).argmin(axis=1)
        counts = np.bincount(nearest, minlength=cells)
        sums = _cluster_sums(points, nearest, cells)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _principal_basis(centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal top principal directions of the centres (randomised, seeded)."""
    origin = centers.mean(axis=0)
    shifted = centers - origin
    dims = min(_PROJECTION_DIMS, centers.shape[1], centers.shape[0])
    if dims == centers.shape[1]:
        return np.eye(centers.shape[1]), origin

    # A randomised range finder with two power iterations is plenty for a bound whose
    # only job is pruning; a fixed seed keeps the merge deterministic.
    sketch = np.random.default_rng(0).standard_normal((centers.shape[1], dims))
    basis, _ = np.linalg.qr(shifted @ sketch)
    for _ in range(2):
        basis, _ = np.linalg.qr(shifted.T @ basis)
        basis, _ = np.linalg.qr(shifted @ basis)
    basis, _ = np.linalg.qr(shifted.T @ basis)
    return basis, origin


# -- wire ----------------------------------------------------------------------------


def _wire_ints(array: np.ndarray, name: str) -> IntArray:
    if array.ndim != 1:
        raise WireError(f"balls field {name!r} must be 1-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise WireError(f"balls field {name!r} must hold integers, got {array.dtype}")
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise WireError(f"balls field {name!r} holds a value beyond int64")
    return array.astype(np.int64)


def _wire_floats(array: np.ndarray, name: str, *, ndim: int) -> FloatArray:
    if array.ndim != ndim:
        raise WireError(
            f"balls field {name!r} must be {ndim}-D, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise WireError(f"balls field {name!r} must hold floats, got {array.dtype}")
    with np.errstate(over="ignore"):
        converted = array.astype(np.float32)
    if not np.isfinite(converted).all():
        raise WireError(f"balls field {name!r} holds NaN or infinite values")
    return converted
