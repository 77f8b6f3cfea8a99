"""Shared fixtures: a real Mosquitto on a free loopback port, small data sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from grbfl.broker import PrivateBroker

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A private Mosquitto for one test, stopped afterwards."""
    with PrivateBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """scikit-learn's digits as real PNG image folders (train, test)."""
    from grbfl.data import export_digits

    return export_digits(tmp_path_factory.mktemp("digits"))
