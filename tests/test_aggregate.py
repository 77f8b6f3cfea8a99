"""Federated averaging of whole model states."""

from __future__ import annotations

import numpy as np
import pytest

from grbfl.aggregate import weighted_average
from grbfl.errors import GrbflError
from grbfl.models import build_model
from grbfl.weights import load_numpy_state, state_to_numpy


def test_average_is_weighted_by_sample_counts() -> None:
    a = {"w": np.array([0.0, 10.0], np.float32)}
    b = {"w": np.array([4.0, 20.0], np.float32)}
    out = weighted_average([a, b], [300, 100])
    np.testing.assert_allclose(out["w"], [1.0, 12.5])
    assert out["w"].dtype == np.float32


def test_integer_buffers_are_rounded_not_truncated_and_keep_their_dtype() -> None:
    a = {"n": np.array(10, np.int64)}
    b = {"n": np.array(13, np.int64)}
    out = weighted_average([a, b], [1, 2])  # 12.0 exactly
    assert out["n"].dtype == np.int64 and int(out["n"]) == 12
    out = weighted_average([a, b], [1, 1])  # 11.5 rounds to even 12, never 11
    assert int(out["n"]) == 12


def test_half_precision_is_averaged_in_double_and_cast_back() -> None:
    a = {"h": np.full(3, 1000.0, np.float16)}
    b = {"h": np.full(3, 1001.0, np.float16)}
    out = weighted_average([a, b], [1, 1])
    assert out["h"].dtype == np.float16
    assert np.all(np.isfinite(out["h"]))


def test_averaging_identical_models_changes_nothing() -> None:
    model = build_model("cnn", 10, seed=3)
    state = state_to_numpy(model)
    out = weighted_average([state, state, state], [5, 7, 11])
    for name, value in state.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7)
        assert out[name].dtype == value.dtype
    load_numpy_state(model, out)


def test_no_states_or_zero_samples_is_an_error() -> None:
    with pytest.raises(GrbflError):
        weighted_average([], [])
    with pytest.raises(GrbflError, match="more than zero"):
        weighted_average([{"w": np.zeros(1, np.float32)}], [0])
