"""Class shapes: how the dimensions of a class's embedding balls move together.

A ball's per-dimension variance says how far its members stray along each axis, not
which axes stray together, and embeddings of one class stray together a lot (46% of
the cnn's pooled ReLU features of CIFAR-10 are exactly zero; whole groups of channels
light up at once). A head trained on samples that vary each dimension on its own
learns boundaries that real embeddings cross. So in the ``grbfl`` strategy a
participant adds, per class, the top principal directions of its members' deviations
from their own ball's centre, over all members of the balls it shares: one ``(rank,
dims)`` matrix of directions scaled by their standard deviations. Each pools all of a
class's shared members (thousands on CIFAR-10; 164 KB per participant for the cnn's
256 dims and 10 classes, against 207 KB for its 100 balls), and a class whose shared
balls hold fewer than ``min_members`` samples gets none (a few members would show
their individual deviations).

Measured with ``bench/head_from_balls.py`` (CIFAR-10, cnn after 3 epochs, 3 IID
participants of 100 balls each, a fresh head trained on 20,000 samples from the
merged balls): 0.7424 on the test set with per-dimension variance alone, 0.7519 with
rank-8 shapes, 0.7575 with rank 16, 0.7548 with rank 32; a head trained on the real
embeddings reached 0.7627. More balls without shapes help less: 0.7463 with 300
balls per participant, 0.7493 with 1,000.

The aggregator pools the participants' shapes of a class, weighting each by its member
count, back to ``rank`` directions; sampling then draws the correlated part along
those directions and the rest of each ball's own variance per dimension
(``balls.sample_balls``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import WireError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# Directions kept per class: on the measurement above, past 16 the extra directions
# add noise, not accuracy.
SHAPE_RANK = 16

# A class shares its shape only when its shared balls pool this many members, and
# 8 per direction at higher ranks: with a few members, the top directions are those
# members' own deviations.
SHAPE_MIN_MEMBERS = 128

# What the aggregator accepts from the wire.
MAX_SHAPE_RANK = 64

_WIRE_FIELDS = ("labels", "counts", "axes")

# Pooling: up to _EXACT_ROWS x rank stacked rows are decomposed exactly; more take
# a randomized range finder with _OVERSAMPLE extra columns and _POWER_STEPS power
# iterations, which recovers leading directions to float precision when the
# spectrum falls off as embedding spectra do.
_EXACT_ROWS = 4
_OVERSAMPLE = 8
_POWER_STEPS = 2

# Slack when checking a shape's variance against its balls': float32 rounding of
# the centres and the variances, far below any lie that matters.
_VARIANCE_SLACK = 1e-3


@dataclass(eq=False)  # arrays have no single truth value to compare by
class ClassShapes:
    """Per class: member count and principal directions scaled by their std."""

    labels: IntArray  # (C,) distinct class labels
    counts: IntArray  # (C,) members the directions were measured on
    axes: FloatArray  # (C, rank, dims)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls, dim: int, rank: int = SHAPE_RANK) -> ClassShapes:
        none = np.zeros(0, np.int64)
        return cls(none, none.copy(), np.zeros((0, rank, dim), np.float32))

    def variances(self) -> FloatArray:
        """(C, dims): the per-dimension variance the directions account for."""
        return np.square(self.axes, dtype=np.float32).sum(axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _WIRE_FIELDS}

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.to_arrays().values())

    @classmethod
    def from_arrays(
        cls,
        arrays: object,
        *,
        dim: int,
        num_classes: int,
        max_count: int,
        max_rank: int = MAX_SHAPE_RANK,
    ) -> ClassShapes:
        """Validate shapes received from the wire; raise WireError naming the field."""
        if not isinstance(arrays, dict):
            raise WireError(f"shapes must be a mapping of arrays, got {type(arrays)}")
        for name in _WIRE_FIELDS:
            if not isinstance(arrays.get(name), np.ndarray):
                raise WireError(f"shapes field {name!r} is missing or not an array")
        labels, counts, axes = (arrays[name] for name in _WIRE_FIELDS)
        for name, array in (("labels", labels), ("counts", counts)):
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise WireError(f"shapes field {name!r} must be 1-D integers")
        if axes.ndim != 3 or not np.issubdtype(axes.dtype, np.floating):
            raise WireError(f"shapes field 'axes' must be 3-D floats, got {axes.shape}")
        count = labels.shape[0]
        if counts.shape[0] != count or axes.shape[0] != count:
            raise WireError(
                f"shapes fields disagree: {count} labels, {counts.shape[0]} counts, "
                f"{axes.shape[0]} axes"
            )
        if not 1 <= axes.shape[1] <= max_rank:
            raise WireError(
                f"shapes field 'axes' has rank {axes.shape[1]}, expected 1..{max_rank}"
            )
        if axes.shape[2] != dim:
            raise WireError(
                f"shapes field 'axes' has {axes.shape[2]} dims, expected {dim}"
            )
        if count and (labels.min() < 0 or labels.max() >= num_classes):
            raise WireError(
                f"shapes field 'labels' holds a label outside [0, {num_classes})"
            )
        if np.unique(labels).shape[0] != count:
            raise WireError("shapes field 'labels' names a class twice")
        if count and (counts.min() < 1 or counts.max() > max_count):
            raise WireError(
                f"shapes field 'counts' holds a count outside 1..{max_count}"
            )
        with np.errstate(over="ignore"):
            converted = axes.astype(np.float32)
            # Sampling squares the axes in float32 (ClassShapes.variances).
            squares = np.square(converted).sum(axis=1)
        if not np.isfinite(converted).all() or not np.isfinite(squares).all():
            raise WireError("shapes field 'axes' holds NaN or infinite values")
        return cls(labels.astype(np.int64), counts.astype(np.int64), converted)


def check_fits_balls(
    shapes: ClassShapes,
    labels: np.ndarray,
    sizes: np.ndarray,
    variances: np.ndarray,
) -> None:
    """Refuse shapes that the same update's balls could not have produced.

    A class's shape is measured on exactly the members of its shared balls, so its
    count is their summed size; and its directions are the top of the covariance of
    the members' deviations from their ball centres, whose diagonal is the
    size-weighted mean of those balls' variances, so on no dimension can they
    explain more than that. A count that lied would weigh a participant's shape
    above others' in the pool; axes that lied would throw the samples of its class
    to the edges of their balls.
    """
    if not len(shapes):
        return

    # Members and size-weighted variance sums of each class's balls, in one pass.
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    row = np.searchsorted(classes, shapes.labels)
    known = np.isin(shapes.labels, classes)
    members = np.zeros(len(shapes), np.int64)
    pooled = np.zeros(shapes.axes.shape[::2], np.float32)
    if known.any():
        # float32 sums: rounding far inside _VARIANCE_SLACK, and float64 copies of
        # every ball's variances cost more than the rest of the check.
        weighted = variances[order] * sizes[order, None].astype(np.float32)
        members[known] = np.add.reduceat(sizes[order], starts)[row[known]]
        pooled[known] = np.add.reduceat(weighted, starts, axis=0)[row[known]]

    wrong = np.flatnonzero(members != shapes.counts)
    if wrong.shape[0]:
        first = int(wrong[0])
        raise WireError(
            f"shapes field 'counts' says {int(shapes.counts[first])} members for "
            f"class {int(shapes.labels[first])}, its balls hold {int(members[first])}"
        )
    pooled /= np.maximum(members, 1)[:, None]
    limit = pooled * (1 + _VARIANCE_SLACK) + _VARIANCE_SLACK * pooled.max(
        axis=1, keepdims=True
    )
    over = np.flatnonzero((shapes.variances() > limit).any(axis=1))
    if over.shape[0]:
        raise WireError(
            f"shapes field 'axes' of class {int(shapes.labels[over[0]])} spreads "
            "further than its balls' variances allow"
        )


def class_shapes(
    x: np.ndarray,
    y: np.ndarray,
    centers: np.ndarray,
    member_ball: np.ndarray,
    shared: np.ndarray,
    *,
    rank: int = SHAPE_RANK,
    min_members: int | None = None,
) -> ClassShapes:
    """The shapes of the classes in x, y, from the members of shared balls only.

    member_ball gives each sample's ball (a row of centers); shared marks the balls
    that leave the device. Members of balls that stay are left out. min_members
    defaults to SHAPE_MIN_MEMBERS, or 8 per direction when that is more.
    """
    if min_members is None:
        min_members = max(SHAPE_MIN_MEMBERS, 8 * rank)
    dim = int(x.shape[1])
    labels, counts, axes = [], [], []
    in_shared = np.asarray(shared, np.bool_)[member_ball]
    for label in np.unique(y):
        rows = np.flatnonzero((y == label) & in_shared)
        if rows.shape[0] < max(min_members, 2):
            continue

        # Deviations from each member's own (sent, float32) centre, then the top
        # eigenvectors of their covariance, scaled by the square root of the eigenvalue.
        deviations = x[rows].astype(np.float64)
        deviations -= centers[member_ball[rows]].astype(np.float64)
        covariance = deviations.T @ deviations / rows.shape[0]
        values, vectors = np.linalg.eigh(covariance)
        top = np.argsort(values)[::-1][: min(rank, dim)]
        scaled = vectors[:, top].T * np.sqrt(np.maximum(values[top], 0.0))[:, None]
        block = np.zeros((rank, dim), np.float32)
        block[: scaled.shape[0]] = scaled
        labels.append(int(label))
        counts.append(int(rows.shape[0]))
        axes.append(block)
    if not labels:
        return ClassShapes.empty(dim, rank)
    return ClassShapes(
        np.asarray(labels, np.int64), np.asarray(counts, np.int64), np.stack(axes)
    )


def pool_shapes(sets: list[ClassShapes], rank: int = SHAPE_RANK) -> ClassShapes:
    """One shape per class from several participants', weighted by member count.

    Stacking each participant's directions times sqrt(its share of the members)
    gives a matrix whose Gram matrix is the pooled covariance of those directions;
    its top right singular vectors, scaled by the singular values, keep ``rank`` of
    them.
    """
    filled = [shapes for shapes in sets if len(shapes)]
    if not filled:
        return ClassShapes.empty(sets[0].axes.shape[2] if sets else 0, rank)
    dim = filled[0].axes.shape[2]
    pooled_labels, pooled_counts, pooled_axes = [], [], []
    for label in np.unique(np.concatenate([s.labels for s in filled])):
        parts = []
        for shapes in filled:
            row = np.flatnonzero(shapes.labels == label)
            if row.shape[0]:
                parts.append((int(shapes.counts[row[0]]), shapes.axes[row[0]]))
        total = sum(count for count, _ in parts)
        stacked = np.concatenate(
            [axes.astype(np.float64) * np.sqrt(count / total) for count, axes in parts]
        )
        block = np.zeros((rank, dim), np.float32)
        top = _top_directions(stacked, rank)
        block[: top.shape[0]] = top
        pooled_labels.append(int(label))
        pooled_counts.append(total)
        pooled_axes.append(block)
    return ClassShapes(
        np.asarray(pooled_labels, np.int64),
        np.asarray(pooled_counts, np.int64),
        np.stack(pooled_axes),
    )


def _top_directions(stacked: np.ndarray, rank: int) -> np.ndarray:
    """The top ``rank`` right singular vectors of stacked, times their values.

    A few participants' worth of rows are decomposed exactly. Beyond that (100
    participants stack 1,600 rows of 512 dims per class, whose full SVD took 0.14 s
    here, 1.4 s for 10 classes) a seeded randomized range finder with two power
    iterations finds the same leading directions from products with a thin matrix
    (0.005 s).
    """
    if stacked.shape[0] <= _EXACT_ROWS * rank:
        # With u a unit eigenvector of stacked @ stacked.T for eigenvalue s**2,
        # u @ stacked is s times a right singular vector: exact, and a tenth of the
        # time np.linalg.svd took on 48 x 512.
        values, vectors = np.linalg.eigh(stacked @ stacked.T)
        top = np.argsort(values)[::-1][: min(rank, values.shape[0])]
        return vectors[:, top].T @ stacked
    # float32 products: two thirds of the time, and still 4e-7 of the covariance
    # from the exact directions on 100 participants' CIFAR-like spectra.
    matrix = stacked.astype(np.float32)
    width = min(rank + _OVERSAMPLE, matrix.shape[1])
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((matrix.shape[1], width), dtype=np.float32)
    for _ in range(1 + _POWER_STEPS):
        basis = np.linalg.qr(matrix.T @ (matrix @ basis))[0]
    _, singular, right = np.linalg.svd(matrix @ basis, full_matrices=False)
    keep = min(rank, singular.shape[0])
    return (right[:keep] @ basis.T) * singular[:keep, None]
