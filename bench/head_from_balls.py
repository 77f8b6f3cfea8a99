"""How well a classifier head learns from embedding balls, without the federation.

Trains the small CNN on all of CIFAR-10 for a few epochs (kept in ``--cache-dir``),
embeds the training set, splits it into 3 IID parts, finds each part's balls and class
shapes as a participant would, merges and pools them as the aggregator would, then
trains a fresh head on samples drawn from them and prints its test accuracy, beside a
head trained on the real embeddings of the same extractor:

    .venv/bin/python bench/head_from_balls.py

The gap between the two is what the ``grbfl`` strategy gives up by sending balls
instead of the head; ``--ranks`` compares shape ranks (0 is per-dimension variance
only), ``--clusters`` the number of balls per part.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from grbfl.balls import (
    BallSet,
    BallSettings,
    find_ball_members,
    merge_balls,
    sample_balls,
    select_balls,
    shareable,
)
from grbfl.data import CIFAR10_CLASSES, load_image_folder, partition
from grbfl.models import GrbflNet, build_model
from grbfl.shapes import ClassShapes, class_shapes, pool_shapes
from grbfl.simulate import DEFAULT_CACHE
from grbfl.training import TrainSettings, embed, train, train_head

# The aggregator's head training (strategy.py): 20,000 samples, 5 epochs, batch 64.
SAMPLES = 20_000
HEAD = TrainSettings(epochs=5, batch_size=64, lr=0.05, seed=0)


def trained_extractor(args: argparse.Namespace) -> GrbflNet:
    """The CNN after args.epochs epochs on the whole training set, cached."""
    model = build_model("cnn", 10)
    path = args.cache_dir / f"head-bench-cnn-e{args.epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model
    images = load_image_folder(
        args.data / "train", CIFAR10_CLASSES, cache_dir=DEFAULT_CACHE / "images"
    )
    started = time.perf_counter()
    train(
        model,
        images.as_float(),
        images.labels,
        TrainSettings(epochs=args.epochs, batch_size=16, lr=0.05, seed=1),
    )
    print(f"trained the extractor in {time.perf_counter() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def head_accuracy(
    model: GrbflNet,
    feats: np.ndarray,
    labels: np.ndarray,
    test: np.ndarray,
    y: np.ndarray,
) -> float:
    """Test accuracy of a fresh head trained on feats, labels."""
    torch.manual_seed(0)
    model.head.reset_parameters()
    train_head(model, feats, labels, HEAD)
    with torch.no_grad():
        predicted = model.head(torch.from_numpy(test)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10"))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE / "bench")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--clusters", type=int, nargs="+", default=[100])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 16, 32])
    args = parser.parse_args()

    model = trained_extractor(args)
    train_set = load_image_folder(
        args.data / "train", CIFAR10_CLASSES, cache_dir=DEFAULT_CACHE / "images"
    )
    test_set = load_image_folder(
        args.data / "test", CIFAR10_CLASSES, cache_dir=DEFAULT_CACHE / "images"
    )
    feats, labels = embed(model, train_set.as_float()), train_set.labels
    print(f"share of embedding values that are exactly zero: {(feats == 0).mean():.3f}")
    test_feats = embed(model, test_set.as_float())
    real = head_accuracy(model, feats, labels, test_feats, test_set.labels)
    print(f"head on the real embeddings: {real:.4f}")

    for clusters in args.clusters:
        settings = BallSettings(n_clusters=clusters, variance_threshold=0.0)
        sets = []
        part_shapes: dict[int, list[ClassShapes]] = {rank: [] for rank in args.ranks}
        for owner, idx in enumerate(partition(labels, 3, "iid", 0)):
            x, y = feats[idx], labels[idx]
            found, exposes, member_ball = find_ball_members(x, y, 10, settings)
            kept, _ = select_balls(found, 10, settings, exposes_sample=exposes)
            kept.owners[:] = owner
            sets.append(kept)
            shared = shareable(found, settings, exposes)
            for rank in args.ranks:
                if rank:
                    part_shapes[rank].append(
                        class_shapes(
                            x, y, found.centers, member_ball, shared, rank=rank
                        )
                    )
        merged, _ = merge_balls(BallSet.concat(sets))
        for rank in args.ranks:
            shapes = pool_shapes(part_shapes[rank], rank=rank) if rank else None
            drawn, drawn_labels = sample_balls(
                merged,
                SAMPLES,
                np.random.default_rng(0),
                clip=(0.0, float("inf")),
                shapes=shapes,
            )
            accuracy = head_accuracy(
                model, drawn, drawn_labels, test_feats, test_set.labels
            )
            print(
                f"{clusters} balls per part ({len(merged)} merged), shape rank {rank}: "
                f"{accuracy:.4f} ({accuracy - real:+.4f} against the real embeddings)",
                flush=True,
            )


if __name__ == "__main__":
    main()
