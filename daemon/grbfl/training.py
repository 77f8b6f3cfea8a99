"""Training and evaluation loops, run in worker threads by the daemon.

Inputs are numpy arrays in either of two layouts, told apart by dtype:

* float32 (N, 3, 32, 32) with values in [0, 1] (``ImageSet.as_float()``, or samples
  drawn from pixel-space granular balls);
* uint8 (N, 32, 32, 3), the raw ``ImageSet.images``; converted one batch at a time,
  which keeps a 50,000-image set at 150 MB instead of 600 MB (it matters on a Pi).

Nothing here sets torch's thread count: that stays with the caller.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grbfl.models import GrbflNet

SCHEDULES = ("constant", "cosine")

# Random-crop padding: the usual 4 pixels of zeros around a 32x32 image.
CROP_PAD = 4

# Without a warm-up, SGD at lr 0.05 from a fresh initialisation stalled near chance
# level on CIFAR-10; 100 steps (about 6,400 images) fixed it at negligible cost.
WARMUP_STEPS = 100

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainSettings:
    """How one call to train() runs.

    schedule "cosine" follows half a cosine from lr down to 0; "constant" keeps lr.
    One call covers the part [schedule_start, schedule_end] of that cosine: the whole
    of it by default, one round's slice in federated training (settings_for_round),
    so that rounds of local epochs follow the same curve as one centralized run.
    The first warmup_steps steps of a call ramp up linearly from near 0.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    schedule: str = "cosine"
    schedule_start: float = 0.0
    schedule_end: float = 1.0
    warmup_steps: int = WARMUP_STEPS
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.schedule_start <= self.schedule_end <= 1:
            problems.append(
                "schedule_start and schedule_end must satisfy 0 <= start <= end <= 1, "
                f"got {self.schedule_start} and {self.schedule_end}"
            )
        if self.schedule not in SCHEDULES:
            problems.append(
                f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if not 0 <= self.label_smoothing < 1:
            problems.append(
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TrainStats:
    """What one call to train() or train_head() did.

    loss is the mean training loss over the last epoch that ran (partly, if stopped).
    """

    samples: int
    steps: int
    loss: float
    seconds: float


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_tensor(x: np.ndarray, device: torch.device) -> Tensor:
    """A batch of either input layout as float32 (N, 3, 32, 32) in [0, 1]."""
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def _check_inputs(x: np.ndarray, y: np.ndarray | None) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a 4-d image array, got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[3] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {x.shape}")
    elif x.dtype == np.float32:
        if x.shape[1] != 3:
            raise ValueError(f"float32 images must be (N, 3, H, W), got {x.shape}")
    else:
        raise ValueError(f"images must be uint8 NHWC or float32 NCHW, got {x.dtype}")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"labels shape {y.shape} does not match {x.shape[0]} images")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """A shuffled epoch split into near-equal batches of at most batch_size.

    Near-equal rather than full batches plus a remainder: a last batch of a handful of
    samples would give batch norm noisy statistics and a step as large as any other.
    """
    order = torch.randperm(n, generator=gen).numpy()
    count = math.ceil(n / batch_size)
    return np.array_split(order, count)


def augment_batch(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop with CROP_PAD pixels of zero padding and random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (CROP_PAD, CROP_PAD, CROP_PAD, CROP_PAD))

    # One offset per image, applied as a gather: no Python loop over the batch.
    oy = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]

    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def settings_for_round(
    settings: TrainSettings, round_no: int, rounds: int
) -> TrainSettings:
    """The settings for local training in round round_no (1-based) of rounds.

    Each round covers its slice of one cosine over all rounds, and only the first
    round warms up: a participant then follows the learning-rate curve that one
    centralized run over rounds x epochs would. The seed is left to the caller.
    """
    if not 1 <= round_no <= rounds:
        raise ValueError(f"round {round_no} is outside 1..{rounds}")
    return replace(
        settings,
        schedule_start=(round_no - 1) / rounds,
        schedule_end=round_no / rounds,
        warmup_steps=settings.warmup_steps if round_no == 1 else 0,
    )


def _lr_at(settings: TrainSettings, step: int, total: int) -> float:
    """Learning rate for step (0-based) of total steps in this call."""
    lr = settings.lr
    if settings.schedule == "cosine":
        span = settings.schedule_end - settings.schedule_start
        where = settings.schedule_start + span * step / total
        lr *= 0.5 * (1.0 + math.cos(math.pi * where))
    warmup = min(settings.warmup_steps, total // 2)
    if step < warmup:
        lr *= (step + 1) / (warmup + 1)
    return lr


def _optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on biases and batch-norm scales."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.momentum > 0,
    )


def _run_steps(
    step_fn: Callable[[np.ndarray], float],
    n: int,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    progress: ProgressFn | None,
    stop: threading.Event | None,
) -> TrainStats:
    """The epoch loop shared by train() and train_head()."""
    started = time.perf_counter()
    epochs = [_batches(n, settings.batch_size, gen) for _ in range(settings.epochs)]
    total = sum(len(e) for e in epochs)
    steps = samples = 0
    loss_sum, loss_count = 0.0, 0

    def flat() -> Iterator[tuple[int, np.ndarray]]:
        for epoch, batches in enumerate(epochs):
            for idx in batches:
                yield epoch, idx

    current_epoch = -1
    for epoch, idx in flat():
        if stop is not None and stop.is_set():
            break
        if epoch != current_epoch:
            current_epoch, loss_sum, loss_count = epoch, 0.0, 0
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(settings, steps, total)
        loss_sum += step_fn(idx)
        loss_count += 1
        steps += 1
        samples += len(idx)
        if progress is not None:
            progress(steps, total)

    return TrainStats(
        samples=samples,
        steps=steps,
        loss=loss_sum / loss_count if loss_count else math.nan,
        seconds=time.perf_counter() - started,
    )


def train(
    model: GrbflNet,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    params: str = "all",
) -> TrainStats:
    """Train model in place on images x (either layout, see the module) and labels y.

    params "all" trains everything; "head" trains only model.head and leaves the rest,
    batch-norm statistics included, untouched. progress(steps done, total steps) is
    called after every step; when stop is set the call returns after the current step.
    The same model, data and settings give the same result.
    """
    if params not in ("all", "head"):
        raise ValueError(f"params must be 'all' or 'head', got {params!r}")
    _check_inputs(x, y)
    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    device = _device_of(model)
    gen = torch.Generator().manual_seed(settings.seed)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))

    # Choose what trains; frozen layers run in eval mode so batch norm keeps its stats.
    was_training = model.training
    if params == "head":
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        model.head.train()
        trainable = list(model.head.parameters())
        for p in trainable:
            p.requires_grad_(True)
    else:
        frozen = []
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, settings)

    def step(idx: np.ndarray) -> float:
        xb = _to_tensor(x[idx], device)
        if settings.augment:
            xb = augment_batch(xb, gen)
        yb = labels[idx].to(device)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=settings.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    try:
        return _run_steps(step, len(x), settings, optimizer, gen, progress, stop)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def train_head(
    model: GrbflNet,
    feats: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    *,
    stop: threading.Event | None = None,
) -> TrainStats:
    """Train only model.head on embeddings feats (N, embedding_dim); no augmentation."""
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != model.embedding_dim:
        raise ValueError(
            f"features must be (N, {model.embedding_dim}), got shape {feats.shape}"
        )
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match {len(feats)}")
    if len(feats) == 0:
        raise ValueError("cannot train the head on an empty set")
    device = _device_of(model)
    gen = torch.Generator().manual_seed(settings.seed)
    f_all = torch.from_numpy(feats)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head = model.head
    was_training = head.training
    head.train()
    optimizer = _optimizer(list(head.parameters()), settings)

    def step(idx: np.ndarray) -> float:
        t = torch.from_numpy(idx)
        logits = head(f_all[t].to(device))
        loss = F.cross_entropy(
            logits, y_all[t].to(device), label_smoothing=settings.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    try:
        return _run_steps(step, len(feats), settings, optimizer, gen, None, stop)
    finally:
        head.train(was_training)


@dataclass(frozen=True)
class Evaluation:
    """How a model did on a labelled set."""

    accuracy: float
    loss: float  # mean cross-entropy
    predicted: np.ndarray  # int64 (classes,): how often each class was predicted
    actual: np.ndarray  # int64 (classes,): how often each class is the label


@torch.no_grad()
def assess(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> Evaluation:
    """Accuracy, loss and prediction counts of model on x, y; eval mode, no
    gradients."""
    _check_inputs(x, y)
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    device = _device_of(model)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    predicted: np.ndarray | None = None
    try:
        for start in range(0, len(x), batch_size):
            logits = model(_to_tensor(x[start : start + batch_size], device))
            yb = labels[start : start + batch_size].to(device)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            guess = logits.argmax(1)
            correct += int((guess == yb).sum())
            counts = np.bincount(guess.cpu().numpy(), minlength=logits.shape[1])
            predicted = counts if predicted is None else predicted + counts
    finally:
        model.train(was_training)
    assert predicted is not None  # x is not empty
    actual = np.bincount(labels.numpy(), minlength=len(predicted))
    return Evaluation(
        correct / len(x),
        loss_sum / len(x),
        predicted.astype(np.int64),
        actual.astype(np.int64),
    )


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of model on x, y; eval mode, no gradients."""
    result = assess(model, x, y, batch_size)
    return result.accuracy, result.loss


# Images embedded at a time. At 512 the activations of a ResNet-18 took a
# participant's peak memory from 1.6 GB (training, batch 64) to 2.3 GB, over what a
# 4 GB Raspberry Pi can spare; at 128 training sets the peak, and a CPU embeds as
# fast (6.8 s against 7.5 s of CPU for 512 CIFAR images).
EMBED_BATCH = 128


@torch.no_grad()
def embed(model: GrbflNet, x: np.ndarray, batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Embeddings float32 (N, embedding_dim) of images x; eval mode, no gradients."""
    _check_inputs(x, None)
    device = _device_of(model)
    out = np.empty((len(x), model.embedding_dim), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            feats = model.features(_to_tensor(x[start : start + batch_size], device))
            out[start : start + len(feats)] = feats.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
