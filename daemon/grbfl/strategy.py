"""The strategies of DESIGN.md section 4: what a participant computes in each
phase of a round, and what the aggregator does with the answers.

=========  ===============  ======================================================
strategy   phases           leaves a participant
=========  ===============  ======================================================
fedavg     train            all model weights + sample count
grbfl      train, embed     feature-extractor weights; then balls of embeddings
balls      balls            balls in pixel space only (computed once, reused)
=========  ===============  ======================================================

Everything here is synchronous and heavy; the daemons call it in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .aggregate import weighted_average
from .balls import (
    ALGORITHM_VERSION,
    BallSet,
    BallSettings,
    ball_bytes,
    build_balls,
    find_ball_members,
    merge_balls,
    sample_balls,
    select_balls,
    shareable,
)
from .errors import WireError
from .models import MODEL_NAMES, GrbflNet, build_model, head_keys
from .shapes import (
    MAX_SHAPE_RANK,
    SHAPE_RANK,
    ClassShapes,
    check_fits_balls,
    class_shapes,
    pool_shapes,
)
from .training import Evaluation, TrainSettings, assess, embed, train, train_head
from .weights import load_numpy_state, state_to_numpy

log = logging.getLogger(__name__)

# How far pixel samples spread around their ball's centre, in units of the ball's
# per-pixel standard deviation. Independent per-pixel noise is not what tells real
# images apart: a CNN trained on 20,000 samples from CIFAR-10 pixel balls (2,560
# merged balls, 5 epochs; bench/pixel_balls_training.py) reached 0.4265 on the test
# set from the centres alone (augmented), 0.4118 at scale 0.3, and 0.2633 after two
# epochs at scale 1.0, whose samples are mostly noise.
PIXEL_SAMPLE_SCALE = 0.0

# The aggregator trains on samples drawn from the merged balls with this batch,
# whatever the participants' local batch (training.batch_size): the samples are
# plentiful and the aggregator is not memory-bound like a Raspberry Pi.
SERVER_BATCH_SIZE = 64

# A participant claiming more samples than this is lying or broken; the cap keeps
# one update from dominating (or overflowing) the weighted average.
MAX_SAMPLES = 10**9

PHASES: dict[str, tuple[str, ...]] = {
    "fedavg": ("train",),
    "grbfl": ("train", "embed"),
    "balls": ("balls",),
}


@dataclass(frozen=True)
class Order:
    """A parsed `run` message: what the aggregator asks for right now."""

    run: str
    round: int
    phase: str
    attempt: int
    announce: str
    deadline: float
    strategy: str
    settings: dict[str, Any]
    model_digest: str | None
    model_name: str
    classes: tuple[str, ...]

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run, self.round, self.phase)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Order:
        where = "run message"
        phase = wire.require(body, "phase", str, where)
        digest = body.get("model_digest")
        if digest is not None and not isinstance(digest, str):
            raise WireError(f"{where}: field 'model_digest' has the wrong type")
        strategy = wire.require(body, "strategy", str, where)
        if strategy not in PHASES or phase not in PHASES[strategy]:
            raise WireError(f"{where}: unknown strategy/phase {strategy}/{phase}")
        settings = wire.require(body, "settings", dict, where)
        _check_settings(settings, where)
        return cls(
            run=wire.require(body, "run", str, where),
            round=wire.require(body, "round", int, where),
            phase=phase,
            attempt=wire.require(body, "attempt", int, where),
            announce=wire.require(body, "announce", str, where),
            deadline=float(wire.require(body, "deadline", (int, float), where)),
            strategy=strategy,
            settings=settings,
            model_digest=digest,
            model_name=wire.require(body, "model", str, where),
            classes=tuple(wire.require(body, "classes", list, where)),
        )


# What a participant accepts in a run message's settings: (type, low, high).
_SETTINGS_RANGES: dict[str, tuple[type, float, float]] = {
    "local_epochs": (int, 1, 1000),
    "batch_size": (int, 1, 65536),
    "lr": (float, 1e-8, 10.0),
    "n_clusters": (int, 1, 1_000_000),
    "variance_threshold": (float, 0.0, 1e9),
    "min_size": (int, 1, 1_000_000),
    "warmup_steps": (int, 0, 1_000_000),
}


def _check_settings(settings: dict[str, Any], where: str) -> None:
    """Refuse settings a participant could not train with, naming the field."""
    for key, (kind, low, high) in _SETTINGS_RANGES.items():
        value = settings.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        whole = isinstance(value, int) or kind is float
        if not (
            number
            and whole
            and math.isfinite(value)  # type: ignore[arg-type]
            and low <= value <= high  # type: ignore[operator]
        ):
            raise WireError(
                f"{where}: settings.{key} = {value!r} is not a {kind.__name__} "
                f"in {low:g}..{high:g}"
            )


def train_settings(settings: dict[str, Any], seed: int) -> TrainSettings:
    return TrainSettings(
        epochs=int(settings["local_epochs"]),
        batch_size=int(settings["batch_size"]),
        lr=float(settings["lr"]),
        augment=bool(settings.get("augment", True)),
        schedule=str(settings.get("schedule", "cosine")),
        warmup_steps=int(settings.get("warmup_steps", 0)),
        seed=seed,
    )


def embedding_ball_settings(
    order: Order, feats: np.ndarray, labels: np.ndarray
) -> BallSettings:
    """Ball settings for the embedding space, where the threshold is relative.

    Pixels live in [0, 1], so there variance_threshold is an absolute variance.
    An embedding has no fixed scale (it changes as the extractor trains), so it
    has its own knob, embedding_variance_threshold, taken as a fraction of the
    spread of a class in this participant's embeddings (the mean per-dimension
    variance within a class, averaged over its classes): a ball is shared when
    its spread is at least that fraction of a class's, whatever the units.
    """
    settings = ball_settings(order.settings)
    fraction = order.settings.get("embedding_variance_threshold", 0.0)
    if not isinstance(fraction, int | float) or not 0 <= fraction <= 10:
        raise WireError(f"run message: embedding_variance_threshold = {fraction!r}")
    labels = np.asarray(labels)
    spreads = [
        float(feats[labels == c].var(axis=0, dtype=np.float64).mean())
        for c in np.unique(labels)
        if int((labels == c).sum()) > 1
    ]
    spread = float(np.mean(spreads)) if spreads else 0.0
    return replace(settings, variance_threshold=float(fraction) * spread)


def shape_rank(settings: dict[str, Any]) -> int:
    """Directions per class in grbfl's class shapes; 0 sends none."""
    rank = settings.get("shape_rank", SHAPE_RANK)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise WireError(f"run message: settings.shape_rank = {rank!r} is not an int")
    if not 0 <= rank <= MAX_SHAPE_RANK:
        raise WireError(
            f"run message: settings.shape_rank = {rank} is not in 0..{MAX_SHAPE_RANK}"
        )
    return rank


def ball_settings(settings: dict[str, Any], seed: int = 0) -> BallSettings:
    return BallSettings(
        n_clusters=int(settings["n_clusters"]),
        variance_threshold=float(settings["variance_threshold"]),
        min_size=int(settings["min_size"]),
        seed=seed,
    )


# --- participant side -----------------------------------------------------------


@dataclass
class LocalData:
    """A participant's images, decoded once: float32 NCHW in [0, 1]."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            h = hashlib.sha256()
            h.update(self.x.tobytes())
            h.update(self.y.tobytes())
            self.digest = h.hexdigest()[:16]


def _seed_for(node: str, round_: int, base: int) -> int:
    digest = hashlib.sha256(f"{base}/{node}/{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def participant_work(
    order: Order,
    model_state: dict[str, np.ndarray] | None,
    data: LocalData,
    node: str,
    cache_dir: Path,
    stop: threading.Event,
) -> dict[str, Any]:
    """Do this participant's part of one phase; return the update body."""
    timings: dict[str, float] = {}
    body: dict[str, Any] = {"samples": int(len(data.y)), "timings": timings}

    if order.phase == "balls":
        balls, report, cluster_s = pixel_balls(data, order.settings, cache_dir)
        timings["cluster_s"] = cluster_s
        body["balls"] = balls.to_arrays()
        body["ball_report"] = report
        return body

    if model_state is None:
        raise WireError(f"phase {order.phase} needs a model and none arrived")
    if order.model_name not in MODEL_NAMES:
        raise WireError(f"run message: unknown model {order.model_name!r}")
    model = build_model(order.model_name, data.num_classes)
    reference = state_to_numpy(model)
    load_numpy_state(model, wire.check_state(model_state, reference, "model message"))

    if order.phase == "train":
        settings = train_settings(order.settings, _seed_for(node, order.round, 17))
        stats = train(model, data.x, data.y, settings, stop=stop)
        timings["train_s"] = stats.seconds
        body["train_loss"] = stats.loss
        exclude = head_keys(model) if order.strategy == "grbfl" else set()
        body["weights"] = state_to_numpy(model, exclude=exclude)
        return body

    if order.phase == "embed":
        start = time.perf_counter()
        feats = embed(model, data.x)
        timings["embed_s"] = time.perf_counter() - start
        start = time.perf_counter()
        rules = embedding_ball_settings(order, feats, data.y)
        found, exposes, member_ball = find_ball_members(
            feats, data.y, data.num_classes, rules
        )
        shared = shareable(found, rules, exposes)
        kept, embed_report = select_balls(
            found, data.num_classes, rules, exposes_sample=exposes
        )
        body["balls"] = kept.to_arrays()
        rank = shape_rank(order.settings)
        if rank:
            shapes = class_shapes(
                feats, data.y, found.centers, member_ball, shared, rank=rank
            )
            body["shapes"] = shapes.to_arrays()
        timings["cluster_s"] = time.perf_counter() - start
        body["ball_report"] = embed_report.as_dict()
        return body

    raise WireError(f"unknown phase {order.phase!r}")


def pixel_balls(
    data: LocalData, settings: dict[str, Any], cache_dir: Path
) -> tuple[BallSet, dict[str, Any], float]:
    """Pixel-space balls, computed once per data set and settings.

    Clustering the same samples differently every round would reveal more about
    them than one clustering does, so the result is kept on disk and reused.
    """
    bs = ball_settings(settings)
    key = hashlib.sha256(
        f"{data.digest}/{bs.n_clusters}/{bs.variance_threshold}/{bs.min_size}/"
        f"{bs.seed}/{ALGORITHM_VERSION}".encode()
    ).hexdigest()[:20]
    path = cache_dir / f"balls-{key}.cbor"
    if path.exists():
        try:
            cached = wire.decode_cbor(path.read_bytes(), limit=1 << 31)
            balls = BallSet.from_arrays(cached["balls"], owner=0)
            return balls, cached["report"], 0.0
        except (WireError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring unreadable ball cache %s: %s", path, exc)

    start = time.perf_counter()
    flat = data.x.reshape(len(data.x), -1)
    _, kept, report = build_balls(flat, data.y, data.num_classes, bs)
    seconds = time.perf_counter() - start
    report_dict = report.as_dict()
    try:
        write_atomic(
            path, wire.encode_cbor({"balls": kept.to_arrays(), "report": report_dict})
        )
    except OSError as exc:
        log.warning("cannot cache balls in %s (%s); they are still shared", path, exc)
    return kept, report_dict, seconds


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- aggregator side ------------------------------------------------------------


@dataclass
class Contribution:
    """One validated update of one participant for one phase."""

    node: str
    samples: int
    timings: dict[str, float]
    nbytes: int
    weights: dict[str, np.ndarray] | None = None
    balls: BallSet | None = None
    shapes: ClassShapes | None = None
    ball_report: dict[str, Any] = field(default_factory=dict)


class ServerStrategy:
    """The aggregator's half of a strategy; owns the global model."""

    def __init__(
        self,
        name: str,
        model_name: str,
        num_classes: int,
        settings: dict[str, Any],
        seed: int = 0,
    ) -> None:
        self.name = name
        self.phases = PHASES[name]
        self.settings = settings
        self.num_classes = num_classes
        self.model: GrbflNet = build_model(model_name, num_classes, seed=seed)
        self.seed = seed
        self._head = head_keys(self.model)

    def global_state(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.model)

    def expected_weights(self, phase: str) -> dict[str, np.ndarray] | None:
        """The arrays an update's weights must match in name, shape and dtype.

        Views of the model's tensors, not copies: only their shapes and dtypes are
        read, and copying a ResNet-18 for every update validated cost as much as
        averaging it.
        """
        if phase != "train":
            return None
        exclude = self._head if self.name == "grbfl" else set()
        return {
            name: tensor.detach().cpu().numpy()
            for name, tensor in self.model.state_dict().items()
            if name not in exclude
        }

    def ball_dim(self, phase: str) -> int:
        if phase == "embed":
            return int(self.model.embedding_dim)
        return 3 * 32 * 32

    def validate(
        self, phase: str, node: str, body: dict[str, Any], owner: int, nbytes: int
    ) -> Contribution:
        """Check every field and array of an update before it is used."""
        where = f"update from {node}"
        samples = wire.require(body, "samples", int, where)
        if not 0 < samples <= MAX_SAMPLES:
            raise WireError(f"{where}: samples = {samples} is not in 1..{MAX_SAMPLES}")
        timings_raw = body.get("timings", {})
        if not isinstance(timings_raw, dict):
            raise WireError(f"{where}: timings must be a map")
        timings = {}
        for key, value in timings_raw.items():
            try:
                seconds = float(value)
            except (TypeError, ValueError, OverflowError):
                continue
            if math.isfinite(seconds) and 0 <= seconds < 1e7:
                timings[str(key)] = seconds
        contribution = Contribution(node, samples, timings, nbytes)

        reference = self.expected_weights(phase)
        if reference is not None:
            contribution.weights = wire.check_state(
                body.get("weights"), reference, where
            )
        elif "weights" in body:
            raise WireError(f"{where}: phase {phase} carries no weights")
        if phase == "train" and "shapes" in body:
            raise WireError(f"{where}: phase train carries no shapes")

        if phase in ("embed", "balls"):
            arrays = wire.require(body, "balls", dict, where)
            balls = BallSet.from_arrays(arrays, owner=owner)
            if len(balls) and balls.centers.shape[1] != self.ball_dim(phase):
                raise WireError(
                    f"{where}: balls have {balls.centers.shape[1]} dimensions, "
                    f"expected {self.ball_dim(phase)}"
                )
            if len(balls) and (
                balls.labels.min() < 0 or balls.labels.max() >= self.num_classes
            ):
                raise WireError(f"{where}: a ball's label is out of range")
            min_size = int(self.settings["min_size"])
            if len(balls) and int(balls.sizes.min()) < min_size:
                raise WireError(f"{where}: a ball has fewer than {min_size} members")
            contribution.balls = balls
            rank = shape_rank(self.settings) if phase == "embed" else 0
            if rank and "shapes" in body:
                shapes = ClassShapes.from_arrays(
                    body["shapes"],
                    dim=self.ball_dim(phase),
                    num_classes=self.num_classes,
                    max_count=samples,
                    max_rank=rank,
                )
                check_fits_balls(shapes, balls.labels, balls.sizes, balls.variances)
                contribution.shapes = shapes
            elif "shapes" in body:
                raise WireError(
                    f"{where}: phase {phase} carries no shapes"
                    + (" (shape_rank is 0)" if phase == "embed" else "")
                )
            report = body.get("ball_report", {})
            contribution.ball_report = report if isinstance(report, dict) else {}
        return contribution

    def apply(
        self, phase: str, round_: int, parts: list[Contribution]
    ) -> dict[str, Any]:
        """Fold one phase's contributions into the global model; return metrics."""
        info: dict[str, Any] = {}
        start = time.perf_counter()
        if phase == "train":
            averaged = weighted_average(
                [p.weights for p in parts if p.weights is not None],
                [p.samples for p in parts],
            )
            load_numpy_state(self.model, averaged)
            info["aggregate_s"] = time.perf_counter() - start
            return info

        # Ball phases: merge, then train on synthetic samples from the merged set.
        sent = BallSet.concat([p.balls for p in parts if p.balls is not None])
        merged, stats = merge_balls(sent)
        info.update(
            balls_sent=int(stats.before),
            balls_after_merge=int(stats.after),
            merge_s=stats.seconds,
            merged_pairs=int(stats.merged_pairs),
            merge_unverified=int(stats.unverified),
            ball_bytes=int(sum(ball_bytes(p.balls) for p in parts if p.balls)),
            shape_bytes=int(sum(p.shapes.nbytes for p in parts if p.shapes)),
        )
        found = sum(int(p.ball_report.get("found", 0)) for p in parts)
        kept = sum(int(p.ball_report.get("kept", 0)) for p in parts)
        info["balls_found"] = found
        info["share_kept"] = kept / found if found else 0.0
        info["degenerate_nodes"] = [
            p.node for p in parts if p.ball_report.get("degenerate")
        ]
        if len(merged) == 0:
            log.warning(
                "round %d: no ball cleared variance_threshold = %g with min_size = %d;"
                " model unchanged (`grbfl balls` shows what each setting keeps)",
                round_,
                float(self.settings["variance_threshold"]),
                int(self.settings["min_size"]),
            )
            info["aggregate_s"] = time.perf_counter() - start
            return info

        log.info(
            "round %d: training the %s on %d samples from %d merged balls (%d epochs)",
            round_,
            "head" if phase == "embed" else "whole model",
            int(self.settings["server_samples"]),
            len(merged),
            int(self.settings["server_epochs"]),
        )
        rng = np.random.default_rng(self.seed * 7919 + round_)
        n = int(self.settings["server_samples"])
        epochs = int(self.settings["server_epochs"])
        settings = TrainSettings(
            epochs=epochs,
            batch_size=SERVER_BATCH_SIZE,
            lr=float(self.settings["lr"]),
            augment=bool(self.settings.get("augment", True)),
            seed=self.seed + round_,
        )
        if phase == "embed":
            # Both models end in ReLU and pooling: embeddings are never negative,
            # so samples below zero would teach the head about impossible inputs.
            shapes = pool_shapes(
                [p.shapes for p in parts if p.shapes is not None],
                rank=shape_rank(self.settings),
            )
            feats, labels = sample_balls(
                merged, n, rng, clip=(0.0, float("inf")), shapes=shapes
            )
            train_head(self.model, feats, labels, settings)
        else:
            flat, labels = sample_balls(
                merged, n, rng, clip=(0.0, 1.0), scale=PIXEL_SAMPLE_SCALE
            )
            images = flat.reshape(-1, 3, 32, 32)
            train(self.model, images, labels, settings)
        info["server_train_s"] = time.perf_counter() - start - stats.seconds
        info["aggregate_s"] = time.perf_counter() - start
        return info

    def is_finite(self) -> bool:
        return all(
            np.isfinite(v).all()
            for v in self.global_state().values()
            if v.dtype.kind == "f"
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        return assess(self.model, x, y)
