"""grbfl balls: options checked before any work, the sweep written safely."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grbfl.cli import build_parser
from grbfl.errors import GrbflError
from grbfl.tuning import ball_sweep


@pytest.fixture()
def small_root(tmp_path: Path) -> Path:
    """Two classes of twelve noisy 32x32 PNGs each: enough for two balls a class."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 40, (32, 32, 3)) + 150 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def _args(root: Path, *options: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["balls", "--data", str(root), "--min-size", "1", *options]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--clusters", "0"], "--clusters 0: each value must be at least 1"),
        (["--clusters", "5,-3"], "--clusters -3"),
        (["--clusters", ","], "--clusters: give at least one value"),
        (["--thresholds", "nan"], "--thresholds nan: each value must be a finite"),
        (["--thresholds", "0.1,-0.5"], "--thresholds -0.5"),
        (["--thresholds", "inf"], "--thresholds inf"),
        (["--limit", "-1"], "--limit -1: must be 0"),
        (["--min-size", "0"], "--min-size 0: must be at least 1"),
    ],
)
def test_bad_option_is_a_one_line_error_naming_it(
    small_root: Path, options: list[str], message: str
) -> None:
    """Each mistake names the option and its value, before any image is decoded."""
    args = _args(small_root / "nowhere", *options)  # no data: checked first

    with pytest.raises(GrbflError) as caught:
        ball_sweep(args)

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_json_that_names_a_folder_is_refused(small_root: Path, tmp_path: Path) -> None:
    """Writing the sweep over a folder would fail only after the clustering."""
    with pytest.raises(GrbflError, match="--json .*: is a folder"):
        ball_sweep(_args(small_root, "--json", str(tmp_path)))


def test_json_under_a_file_is_refused(small_root: Path, tmp_path: Path) -> None:
    """A parent that is a file cannot become a folder: say so in one line."""
    (tmp_path / "plain").write_text("x")

    with pytest.raises(GrbflError, match="cannot create its folder"):
        ball_sweep(_args(small_root, "--json", str(tmp_path / "plain" / "out.json")))


def test_sweep_is_written_into_a_new_folder_in_one_piece(
    small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing folders are created; no temporary file is left beside the result."""
    out = tmp_path / "new" / "deeper" / "sweep.json"

    ball_sweep(
        _args(small_root, "--clusters", "2", "--thresholds", "0.01,1", "--json",
              str(out))
    )  # fmt: skip

    rows = json.loads(out.read_text())
    assert [r["variance_threshold"] for r in rows] == [0.01, 1.0]
    assert all(r["n_clusters"] == 2 for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["sweep.json"]
    assert f"written to {out}" in capsys.readouterr().out


def test_limit_draws_from_every_class(
    small_root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--limit 6 of 24 sorted files takes three of each class, not six cats."""
    out = tmp_path / "sweep.json"

    ball_sweep(
        _args(small_root, "--limit", "6", "--clusters", "2", "--thresholds", "0",
              "--json", str(out))
    )  # fmt: skip

    # Two balls share out by class size: one of three images each, not two of cats.
    assert "6 images, 2 classes" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["kept_per_class"] == [1, 1]
    assert row["size_min"] == row["size_max"] == 3
