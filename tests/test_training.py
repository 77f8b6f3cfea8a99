"""Training, evaluation and embedding loops on a small problem a CNN separates."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from grbfl.models import GrbflNet, build_model, head_keys
from grbfl.training import (
    TrainSettings,
    _lr_at,
    augment_batch,
    embed,
    evaluate,
    settings_for_round,
    train,
    train_head,
)

N_CLASSES = 3
FAST = TrainSettings(epochs=4, batch_size=16, lr=0.05, warmup_steps=4, seed=0)


def _separable(n_per_class: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images: class k is noise with a bright square in colour channel k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    images = rng.integers(0, 90, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        top, left = rng.integers(4, 16, size=2)
        images[i, top : top + 12, left : left + 12, k] = 255
    return images, labels.astype(np.int64)


def _as_float(images: np.ndarray) -> np.ndarray:
    out: np.ndarray = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return out


def _fresh() -> GrbflNet:
    return build_model("cnn", N_CLASSES, seed=0)


def _state(model: GrbflNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_learns_a_separable_problem() -> None:
    """Loss falls well below chance level and the training images are classified."""
    x, y = _separable()
    model = _fresh()
    _, loss_before = evaluate(model, x, y)

    stats = train(model, x, y, FAST)
    accuracy, loss_after = evaluate(model, x, y)

    assert loss_after < 0.5 * loss_before
    assert accuracy >= 0.9
    # 72 images in batches of at most 16: five near-equal batches per epoch.
    assert stats.samples == 4 * len(x) and stats.steps == 4 * 5 and stats.seconds > 0


def test_trained_model_generalises_to_unseen_images() -> None:
    """A sanity check that evaluate measures something real: fresh samples pass too."""
    x, y = _separable(seed=0)
    x_test, y_test = _separable(n_per_class=10, seed=1)
    model = _fresh()

    train(model, x, y, FAST)
    accuracy, loss = evaluate(model, x_test, y_test)

    assert accuracy >= 0.8
    assert 0 <= loss < np.log(N_CLASSES)


def test_training_is_deterministic_for_a_seed() -> None:
    """Same model, data and settings give identical weights; another seed differs."""
    x, y = _separable()
    runs = []
    for seed in (0, 0, 1):
        model = _fresh()
        train(model, x, y, TrainSettings(epochs=1, batch_size=16, seed=seed))
        runs.append(_state(model))

    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["head.weight"], runs[2]["head.weight"])


def test_uint8_and_float_inputs_train_identically() -> None:
    """Raw ImageSet.images and ImageSet.as_float() are interchangeable inputs."""
    x, y = _separable()
    settings = TrainSettings(epochs=1, batch_size=16)
    a, b = _fresh(), _fresh()

    train(a, x, y, settings)
    train(b, _as_float(x), y, settings)

    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in _state(a))


def test_evaluate_returns_sane_values_and_restores_training_mode() -> None:
    """An untrained model scores near chance; the model's mode is left as found."""
    x, y = _separable()
    model = _fresh().train()
    before = _state(model)

    accuracy, loss = evaluate(model, x, y, batch_size=7)

    assert 0.0 <= accuracy <= 1.0
    assert np.isfinite(loss) and loss > 0
    assert model.training
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_training_only_the_head_leaves_the_extractor_untouched() -> None:
    """params='head' changes head weights only; batch-norm statistics stay put."""
    x, y = _separable()
    model = _fresh()
    before = _state(model)

    train(model, x, y, FAST, params="head")
    after = _state(model)

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head_keys(model)
    assert all(p.requires_grad for p in model.parameters())


def test_train_head_fits_the_head_to_given_features_and_nothing_else() -> None:
    """The aggregator's head training on pooled embeddings touches only the head."""
    x, y = _separable()
    model = _fresh()
    feats = embed(model, x)
    before = _state(model)

    stats = train_head(model, feats, y, TrainSettings(epochs=30, batch_size=16))
    after = _state(model)

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head_keys(model)
    with torch.no_grad():
        predicted = model.head(torch.from_numpy(feats)).argmax(1).numpy()
    assert (predicted == y).mean() >= 0.9
    assert stats.steps == 30 * 5


def test_embed_returns_the_eval_mode_features() -> None:
    """float32 (N, embedding_dim), equal to features() in eval mode."""
    x, _ = _separable()
    model = _fresh()

    feats = embed(model, x, batch_size=10)

    assert feats.dtype == np.float32 and feats.shape == (len(x), model.embedding_dim)
    with torch.no_grad():
        direct = model.eval().features(torch.from_numpy(_as_float(x[:5])))
    np.testing.assert_allclose(feats[:5], direct.numpy(), rtol=1e-4, atol=1e-5)


def test_stop_event_ends_training_after_the_current_step() -> None:
    """The daemon shutting down does not wait for the epoch to finish."""
    x, y = _separable()
    stop = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 2:
            stop.set()

    stats = train(_fresh(), x, y, FAST, progress=progress, stop=stop)

    assert stats.steps == 2 and stats.samples == 30  # batches of 15, 15, 14, 14, 14
    assert seen == [(1, 20), (2, 20)]


def test_stop_event_set_beforehand_trains_nothing() -> None:
    """A stop requested before the start returns at once with the weights unchanged."""
    x, y = _separable()
    model = _fresh()
    before = _state(model)
    stop = threading.Event()
    stop.set()

    stats = train(model, x, y, FAST, stop=stop)

    assert stats.steps == 0 and np.isnan(stats.loss)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_batches_are_near_equal_so_no_tiny_last_batch() -> None:
    """50 samples in batches of at most 16: 4 steps of 12-13, not 16+16+16+2."""
    x, y = _separable(n_per_class=17)
    x, y = x[:50], y[:50]

    stats = train(_fresh(), x, y, TrainSettings(epochs=1, batch_size=16))

    assert stats.steps == 4 and stats.samples == 50


def test_augmentation_only_shifts_and_flips_the_image() -> None:
    """Each augmented image is its source shifted by up to 4 pixels, maybe mirrored."""
    x = torch.rand(6, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)

    out = augment_batch(x, gen)

    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        candidates = [
            padded[i, :, dy : dy + 32, dx : dx + 32]
            for dy in range(9)
            for dx in range(9)
        ]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not torch.equal(out, x)


def test_learning_rate_warms_up_then_follows_the_cosine_to_zero() -> None:
    """A linear ramp over the warm-up steps, then a monotone decay ending near zero."""
    settings = TrainSettings(lr=0.1, warmup_steps=3)

    rates = [_lr_at(settings, step, 18) for step in range(18)]

    assert rates[0] < rates[1] < rates[2] < rates[3]
    assert rates[3] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 18)))
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))
    assert rates[-1] < 0.01
    constant = TrainSettings(lr=0.1, schedule="constant", warmup_steps=0)
    assert {_lr_at(constant, step, 18) for step in range(18)} == {0.1}


def test_rounds_follow_the_learning_rate_curve_of_one_centralized_run() -> None:
    """Five rounds of one epoch see the rates one five-epoch run would see."""
    base = TrainSettings(lr=0.05, warmup_steps=10)
    central = [_lr_at(base, step, 100) for step in range(100)]

    rounds = []
    for round_no in range(1, 6):
        settings = settings_for_round(base, round_no, 5)
        rounds += [_lr_at(settings, step, 20) for step in range(20)]

    assert rounds == pytest.approx(central)
    assert settings_for_round(base, 2, 5).warmup_steps == 0
    with pytest.raises(ValueError, match="outside"):
        settings_for_round(base, 6, 5)


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"momentum": 1.0},
        {"schedule": "step"},
        {"warmup_steps": -1},
        {"schedule_start": 0.6, "schedule_end": 0.4},
    ],
)
def test_invalid_settings_raise_value_error(changes: dict[str, object]) -> None:
    """Settings are checked when made, with a message naming the field."""
    with pytest.raises(ValueError, match=next(iter(changes))):
        TrainSettings(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((4, 32, 32, 3), dtype=np.float32),  # float but channels last
        np.zeros((4, 3, 32, 32), dtype=np.uint8),  # uint8 but channels first
        np.zeros((4, 3, 32, 32), dtype=np.float64),
        np.zeros((4, 32, 32), dtype=np.uint8),
    ],
)
def test_inputs_in_an_unsupported_layout_raise_value_error(x: np.ndarray) -> None:
    """Only uint8 NHWC and float32 NCHW are accepted, never guessed."""
    with pytest.raises(ValueError):
        train(_fresh(), x, np.zeros(4, dtype=np.int64), FAST)
