"""How well a CNN learns from CIFAR-10 pixel balls, without the federation around it.

Splits the training set into 3 IID parts, finds each part's balls as a participant
would, merges them as the aggregator would, then trains the small CNN on samples drawn
from the merged balls and prints the test accuracy after every epoch. The balls are
cached (``--cache-dir``), so several sampling settings cost one clustering.

    .venv/bin/python bench/pixel_balls_training.py --clusters 3000 --scale 0

The settings that matter: ``--clusters`` (balls per participant; more, smaller balls
carry more detail and less privacy), ``--min-size`` and ``--threshold`` (what may
leave a device), ``--scale`` (sample spread around a centre, in ball deviations).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from grbfl.balls import BallSet, BallSettings, build_balls, merge_balls, sample_balls
from grbfl.data import CIFAR10_CLASSES, load_image_folder, partition
from grbfl.models import build_model
from grbfl.simulate import DEFAULT_CACHE
from grbfl.training import TrainSettings, evaluate, settings_for_round, train

FIELDS = ("labels", "sizes", "centers", "variances", "radii", "owners")


def find_all(
    images: np.ndarray, labels: np.ndarray, args: argparse.Namespace
) -> BallSet:
    """Every ball of every part, unfiltered, each with its part as owner."""
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    flat = flat.astype(np.float32) / np.float32(255)
    sets = []
    started = time.perf_counter()
    for owner, idx in enumerate(partition(labels, args.parts, "iid", 0)):
        settings = BallSettings(
            n_clusters=args.clusters, variance_threshold=0.0, min_size=args.min_size
        )
        found, _, _ = build_balls(flat[idx], labels[idx], 10, settings)
        sets.append(
            dataclasses.replace(found, owners=np.full(len(found), owner, np.int64))
        )
        print(
            f"part {owner}: {len(found)} balls, median size "
            f"{np.median(found.sizes):.0f}, {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return BallSet.concat(sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10"))
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--min-size", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--scale", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE / "bench")
    args = parser.parse_args()

    cache = DEFAULT_CACHE / "images"
    train_set = load_image_folder(args.data / "train", CIFAR10_CLASSES, cache_dir=cache)
    test_set = load_image_folder(args.data / "test", CIFAR10_CLASSES, cache_dir=cache)
    path = (
        args.cache_dir
        / f"pixel-balls-p{args.parts}-k{args.clusters}-m{args.min_size}.npz"
    )
    if path.exists():
        with np.load(path) as stored:
            found = BallSet(**{name: stored[name] for name in FIELDS})
    else:
        found = find_all(train_set.images, train_set.labels, args)
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{name: getattr(found, name) for name in FIELDS})

    keep = (found.sizes >= args.min_size) & (
        found.variances.mean(axis=1) > args.threshold
    )
    kept = found.subset(keep)
    merged, stats = merge_balls(kept)
    print(
        f"{len(found)} balls found, {len(kept)} kept ({len(kept) / len(found):.0%}, "
        f"{int(kept.sizes.sum())} images), {len(merged)} after merge "
        f"({stats.seconds:.1f} s)",
        flush=True,
    )

    torch.manual_seed(0)
    model = build_model("cnn", 10, seed=0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        flat, labels = sample_balls(
            merged, args.samples, rng, clip=(0.0, 1.0), scale=args.scale
        )
        settings = settings_for_round(
            TrainSettings(epochs=1, batch_size=64, lr=args.lr, seed=epoch),
            epoch,
            args.epochs,
        )
        train(model, flat.reshape(-1, 3, 32, 32), labels, settings)
        accuracy, loss = evaluate(model, test_set.images, test_set.labels)
        print(
            f"epoch {epoch}: accuracy {accuracy:.4f}, loss {loss:.3f}, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
