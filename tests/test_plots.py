"""grbfl plot: figures and TensorBoard scalars from simulate results files."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from grbfl.errors import GrbflError
from grbfl.plots import (
    labels_for,
    load_results,
    mean_phase_seconds,
    plot_results,
    write_tensorboard,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results_doc(
    strategy: str,
    *,
    threshold: float = 0.03,
    n_clusters: int = 100,
    partition: str = "iid",
    accuracies: tuple[float, ...] = (0.5, 0.7, 0.8),
    bytes_up: int = 200_000,
) -> dict[str, Any]:
    """A results document shaped like simulate.summarise writes it."""
    rounds = []
    for i, acc in enumerate(accuracies, start=1):
        phases = {
            "local_training": 2.0,
            "clustering": 0.5 if strategy in ("grbfl", "balls") else 0.0,
            "transfer": 0.25,
            "aggregation": 0.75,
            "evaluation": 0.5,
            "round": 5.0,
        }
        rounds.append(
            {
                "round": i,
                "accuracy": acc,
                "loss": 1.0 / i,
                "bytes_up": bytes_up,
                "bytes_down": 50_000,
                "seconds": 5.0,
                "phases": phases,
                "balls_sent": 40,
            }
        )
    return {
        "strategy": strategy,
        "model": "cnn",
        "participants": 3,
        "partition": partition,
        "settings": {
            "batch_size": 64,
            "lr": 0.05,
            "n_clusters": n_clusters,
            "variance_threshold": threshold,
            "min_size": 5,
        },
        "rounds": rounds,
        "final_accuracy": accuracies[-1],
        "wall_s": 20.0,
    }


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_two_results_files_give_accuracy_and_phase_pngs(tmp_path: Path) -> None:
    """Two strategies at one threshold: accuracy and phases figures, no sweep."""
    grbfl = write(tmp_path / "grbfl.json", results_doc("grbfl"))
    fedavg = write(tmp_path / "fedavg.json", results_doc("fedavg", bytes_up=900_000))

    written = plot_results([grbfl, fedavg], tmp_path / "plots")

    assert [p.name for p in written] == ["accuracy.png", "phases.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_threshold_sweep_draws_the_tradeoff_figure(tmp_path: Path) -> None:
    """A ball strategy at several thresholds adds thresholds.png with references."""
    paths = [
        write(
            tmp_path / f"balls-{t}.json",
            results_doc("balls", threshold=t, bytes_up=int(1e6 / t)),
        )
        for t in (0.01, 0.03, 0.1)
    ]
    paths.append(write(tmp_path / "fedavg.json", results_doc("fedavg")))
    paths.append(
        write(tmp_path / "central.json", results_doc("centralized", bytes_up=0))
    )

    written = plot_results(paths, tmp_path / "out")

    assert [p.name for p in written] == ["accuracy.png", "thresholds.png", "phases.png"]
    for path in written:
        assert_png(path)


def test_labels_add_threshold_and_partition_only_where_they_differ(
    tmp_path: Path,
) -> None:
    """Labels name the strategy, then what tells two files apart."""
    docs = [
        results_doc("balls", threshold=0.01),
        results_doc("balls", threshold=0.1, partition="dirichlet:0.5"),
        results_doc("fedavg", threshold=0.5),
    ]
    results = [
        load_results(write(tmp_path / f"r{i}.json", d)) for i, d in enumerate(docs)
    ]

    labels = labels_for(results)

    assert labels == ["balls thr 0.01 iid", "balls thr 0.1 dirichlet:0.5", "fedavg iid"]


def test_identical_settings_fall_back_on_file_names(tmp_path: Path) -> None:
    """Repeated runs with the same settings stay distinguishable in legends."""
    results = [
        load_results(write(tmp_path / f"seed{i}.json", results_doc("fedavg")))
        for i in range(2)
    ]

    assert labels_for(results) == ["fedavg (seed0)", "fedavg (seed1)"]


def test_phase_means_include_the_unaccounted_rest(tmp_path: Path) -> None:
    """Seconds not in any phase (waiting) show up as 'other'."""
    doc = results_doc("grbfl")
    for r in doc["rounds"]:
        r["seconds"] = 10.0
    results = load_results(write(tmp_path / "r.json", doc))

    means = mean_phase_seconds(results)

    assert means["local_training"] == pytest.approx(2.0)
    assert means["other"] == pytest.approx(10.0 - 4.0)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    """A truncated file is reported by name, not as a traceback."""
    good = write(tmp_path / "good.json", results_doc("grbfl"))
    bad = tmp_path / "broken.json"
    bad.write_text('{"strategy": "grbfl", "rounds": [')

    with pytest.raises(GrbflError, match="broken.json: not valid JSON"):
        plot_results([good, bad], tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


def test_missing_round_key_names_file_and_key(tmp_path: Path) -> None:
    """A round without accuracy names the file and rounds[i].accuracy."""
    doc = results_doc("grbfl")
    del doc["rounds"][1]["accuracy"]
    path = write(tmp_path / "partial.json", doc)

    with pytest.raises(
        GrbflError, match=r"partial.json: missing key 'rounds\[1\].accuracy'"
    ):
        plot_results([path], tmp_path / "plots")


def test_missing_settings_key_names_file_and_key(tmp_path: Path) -> None:
    doc = results_doc("balls")
    del doc["settings"]["variance_threshold"]
    path = write(tmp_path / "nosettings.json", doc)

    with pytest.raises(
        GrbflError, match="nosettings.json: missing key 'settings.variance_threshold'"
    ):
        load_results(path)


def test_wrongly_typed_key_and_empty_rounds_are_refused(tmp_path: Path) -> None:
    doc = results_doc("grbfl")
    doc["rounds"][0]["bytes_up"] = "lots"
    typed = write(tmp_path / "typed.json", doc)
    empty = write(tmp_path / "empty.json", {**results_doc("grbfl"), "rounds": []})

    with pytest.raises(GrbflError, match=r"typed.json: key 'rounds\[0\].bytes_up'"):
        load_results(typed)
    with pytest.raises(GrbflError, match="empty.json: key 'rounds' is empty"):
        load_results(empty)


def test_a_ball_sweep_among_the_results_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `grbfl balls --json` list given with results files (results/*.json) is
    skipped with a warning naming it and what plot expected; the rest is drawn."""
    good = write(tmp_path / "grbfl.json", results_doc("grbfl"))
    sweep = write(tmp_path / "sweep.json", [{"n_clusters": 100, "kept": 80}])

    with caplog.at_level(logging.WARNING, logger="grbfl.plots"):
        written = plot_results([good, sweep], tmp_path / "plots")

    assert [p.name for p in written] == ["accuracy.png", "phases.png"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert (
        "sweep.json: a JSON list, not a `grbfl simulate --json` results"
        in (warnings[0])
    )


def test_plot_fails_when_no_file_is_a_results_file(tmp_path: Path) -> None:
    sweep = write(tmp_path / "sweep.json", [{"n_clusters": 100}])
    other = write(tmp_path / "other.json", {"name": "not a run"})

    with pytest.raises(GrbflError, match="none of the 2 file"):
        plot_results([sweep, other], tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(GrbflError, match="absent.json: cannot read"):
        plot_results([tmp_path / "absent.json"], tmp_path / "plots")


def test_missing_matplotlib_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib the error tells how to get it."""
    path = write(tmp_path / "r.json", results_doc("grbfl"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(GrbflError, match=r"pip install 'grbfl\[plots\]'"):
        plot_results([path], tmp_path / "plots")


class FakeWriter:
    """Stands in for torch's SummaryWriter; records what it was given."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_writes_one_run_per_file_with_round_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file becomes a run; every round logs accuracy, loss, bytes, seconds."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.instances = []
    paths = [
        write(tmp_path / "a.json", results_doc("balls", threshold=0.01)),
        write(tmp_path / "b.json", results_doc("balls", threshold=0.1)),
    ]

    runs = write_tensorboard(paths, tmp_path / "tb")

    assert [p.name for p in runs] == ["balls_thr_0.01", "balls_thr_0.1"]
    first = FakeWriter.instances[0]
    assert first.closed
    assert ("accuracy", 0.8, 3) in first.scalars
    assert ("bytes/up", 200_000.0, 1) in first.scalars
    assert {tag for tag, _, _ in first.scalars} == {
        "accuracy",
        "loss",
        "bytes/up",
        "bytes/down",
        "seconds/round",
    }


def test_tensorboard_with_the_real_writer_leaves_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    path = write(tmp_path / "a.json", results_doc("fedavg"))

    (run,) = write_tensorboard([path], tmp_path / "tb")

    assert list(run.glob("events.out.tfevents.*"))
