"""The classifiers: shapes, deterministic initialisation, the head/extractor split."""

from __future__ import annotations

import pytest
import torch

from grbfl.models import (
    MODEL_NAMES,
    PIXEL_MEAN,
    GrbflNet,
    build_model,
    count_parameters,
    head_keys,
)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def model(model_name: str) -> GrbflNet:
    return build_model(model_name, num_classes=7, seed=0).eval()


def test_model_maps_pixel_batches_to_class_logits(model: GrbflNet) -> None:
    """float32 (N, 3, 32, 32) in [0, 1] in, (N, classes) out, embeddings in between."""
    x = torch.rand(3, 3, 32, 32)

    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)

    assert logits.shape == (3, 7)
    assert feats.shape == (3, model.embedding_dim)
    assert torch.allclose(model.head(feats), logits, atol=1e-5)


def test_default_cnn_is_small_with_a_128_to_256_dim_embedding() -> None:
    """The Pi-sized default: under a million parameters, a compact embedding."""
    cnn = build_model("cnn", 10)

    assert 128 <= cnn.embedding_dim <= 256
    assert count_parameters(cnn) < 1_000_000
    assert count_parameters(build_model("resnet18", 10)) > 10_000_000


def test_same_seed_gives_identical_weights_whatever_the_global_rng(
    model_name: str,
) -> None:
    """Every node builds the same initial model from (name, classes, seed) alone."""
    torch.manual_seed(123)
    a = build_model(model_name, 7, seed=5).state_dict()
    torch.manual_seed(456)
    b = build_model(model_name, 7, seed=5).state_dict()
    c = build_model(model_name, 7, seed=6).state_dict()

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_head_keys_are_exactly_the_classifier_heads_entries(model: GrbflNet) -> None:
    """The grbfl strategy averages everything but these keys."""
    keys = head_keys(model)

    assert keys == {"head.weight", "head.bias"}
    assert all(not k.startswith("head.") for k in set(model.state_dict()) - keys)


def test_state_holds_batch_norm_buffers_but_not_the_pixel_constants(
    model: GrbflNet,
) -> None:
    """The aggregator must average running statistics and handle the int64 counter."""
    state = model.state_dict()

    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == torch.int64 for k in counters)
    assert any(k.endswith("running_mean") for k in state)
    assert any(k.endswith("running_var") for k in state)
    assert not any("pixel_" in k for k in state)


def test_model_normalises_raw_pixels_itself() -> None:
    """An image of the mean colour becomes zero after the built-in normalisation."""
    cnn = build_model("cnn", 10)
    x = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).expand(2, 3, 32, 32)

    assert cnn.normalise(x).abs().max() < 1e-6


def test_unknown_model_name_raises_value_error_listing_the_names() -> None:
    """A typo in the configuration is answered with the allowed names."""
    with pytest.raises(ValueError, match="'cnn', 'resnet18'"):
        build_model("vgg", 10)


def test_batch_norm_statistics_update_in_training_mode_only() -> None:
    """The buffers the aggregator averages do change when a device trains."""
    cnn = build_model("cnn", 10)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    x = torch.rand(8, 3, 32, 32)

    cnn.eval()
    with torch.no_grad():
        cnn(x)
    unchanged = {k: v.clone() for k, v in cnn.state_dict().items()}
    cnn.train()
    cnn(x)
    changed = cnn.state_dict()

    assert all(torch.equal(before[k], unchanged[k]) for k in before)
    counter = next(k for k in changed if k.endswith("num_batches_tracked"))
    assert changed[counter].item() == 1
