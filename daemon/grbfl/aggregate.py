"""Federated averaging of model states, weighted by sample counts."""

from __future__ import annotations

import numpy as np

from .errors import GrbflError


def weighted_average(
    states: list[dict[str, np.ndarray]], weights: list[float]
) -> dict[str, np.ndarray]:
    """Average several states of the same model, entry by entry.

    Floating-point tensors are averaged in float64 and cast back to their dtype.
    Integer buffers (BatchNorm's ``num_batches_tracked`` is the usual one) are
    counters, not parameters: averaging them and truncating would drift, so the
    weighted mean is rounded to the nearest integer instead.
    """
    if not states:
        raise GrbflError("nothing to average: no states")
    if len(states) != len(weights):
        raise GrbflError("one weight per state is needed")
    total = float(sum(weights))
    if total <= 0:
        raise GrbflError("sample counts must add up to more than zero")
    shares = [w / total for w in weights]

    result: dict[str, np.ndarray] = {}
    for name, first in states[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for state, share in zip(states, shares, strict=True):
            acc += share * state[name].astype(np.float64)
        if first.dtype.kind == "f":
            result[name] = acc.astype(first.dtype)
        else:
            result[name] = np.rint(acc).astype(first.dtype)
    return result
