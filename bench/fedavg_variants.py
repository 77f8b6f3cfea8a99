"""FedAvg on CIFAR-10 in one process, to try variants of it without the federation.

Three IID parts (``--parts``) train from the same global model each round, as the
participants of ``grbfl simulate --strategy fedavg`` do, and their states are averaged
by sample count. With ``--parts 1`` it is the centralized reference, epoch by epoch.

    .venv/bin/python bench/fedavg_variants.py --batch 32
    .venv/bin/python bench/fedavg_variants.py --server-lr 2
    .venv/bin/python bench/fedavg_variants.py --recalibrate 2000

``--server-lr`` moves the global weights that many times the averaged change (batch
norm statistics are averaged as usual); ``--recalibrate N`` also reports the accuracy
after recomputing the batch-norm statistics of the averaged model on N images per part.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grbfl.aggregate import weighted_average
from grbfl.data import CIFAR10_CLASSES, load_image_folder, partition
from grbfl.models import build_model
from grbfl.simulate import DEFAULT_CACHE
from grbfl.training import TrainSettings, evaluate, settings_for_round, train
from grbfl.weights import load_numpy_state, state_to_numpy


def recalibrated(model: nn.Module, x: np.ndarray, rows: np.ndarray) -> nn.Module:
    """A copy of model whose batch-norm statistics are recomputed on x[rows]."""
    out = copy.deepcopy(model)
    for layer in out.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over all batches
    out.train()
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            batch = x[rows[start : start + 256]]
            out(torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32) / 255))
    out.eval()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10"))
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--recalibrate", type=int, default=0)
    args = parser.parse_args()

    cache = DEFAULT_CACHE / "images"
    train_set = load_image_folder(args.data / "train", CIFAR10_CLASSES, cache_dir=cache)
    test_set = load_image_folder(args.data / "test", CIFAR10_CLASSES, cache_dir=cache)
    x, y = train_set.images, train_set.labels
    parts = partition(y, args.parts, "iid", 0)
    model = build_model("cnn", 10, seed=0)
    base = TrainSettings(epochs=1, batch_size=args.batch, lr=args.lr)
    started = time.perf_counter()
    for round_ in range(1, args.rounds + 1):
        before = state_to_numpy(model)
        states, counts = [], []
        for i, rows in enumerate(parts):
            local = copy.deepcopy(model)
            settings = dataclasses.replace(
                settings_for_round(base, round_, args.rounds), seed=1000 * round_ + i
            )
            train(local, x[rows], y[rows], settings)
            states.append(state_to_numpy(local))
            counts.append(len(rows))
        averaged = weighted_average(states, counts)
        if args.server_lr != 1.0:
            for key, value in averaged.items():
                if value.dtype.kind == "f" and "running_" not in key:
                    step = args.server_lr * (value - before[key])
                    averaged[key] = (before[key] + step).astype(value.dtype)
        load_numpy_state(model, averaged)
        accuracy, loss = evaluate(model, test_set.images, test_set.labels)
        line = f"round {round_}: accuracy {accuracy:.4f}, loss {loss:.3f}"
        if args.recalibrate:
            rows = np.concatenate([p[: args.recalibrate] for p in parts])
            fixed = recalibrated(model, x, rows)
            fixed_accuracy, _ = evaluate(fixed, test_set.images, test_set.labels)
            line += f", recalibrated {fixed_accuracy:.4f}"
        print(f"{line}, {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
