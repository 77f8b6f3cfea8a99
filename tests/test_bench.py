"""The benchmarks (`make bench`) still run, at toy sizes, and write results.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_GROUPS = {"1 aggregation", "2 wire", "3 orchestration", "4 clustering"}


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.broker
def test_tiny_benchmark_writes_one_complete_entry_per_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every figure has a value, a baseline from the same run, their ratio, and a
    verdict that agrees with its goal; the printed table names each one."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import ENTRY_KEYS

    # README.md's Benchmarks section names every key of an entry.
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in ENTRY_KEYS)

    out = tmp_path / "results.json"
    done = _bench("--tiny", "--quiet", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    document = json.loads(out.read_text())
    assert document["mode"] == "tiny"
    assert document["machine_at_start"]["cores"] >= 1
    figures = document["figures"]
    assert {fig["group"] for fig in figures} == TINY_GROUPS
    for fig in figures:
        assert tuple(fig) == ENTRY_KEYS, fig["name"]
        assert fig["value"] > 0 and fig["baseline"] > 0, fig["name"]
        assert math.isclose(fig["ratio"], fig["value"] / fig["baseline"])
        assert fig["unit"] and fig["baseline_name"], fig["name"]
        assert fig["name"] in done.stdout
        goal = fig["goal"]
        if goal is None:
            assert fig["met"] is None
            continue
        subject = fig[goal["of"]]
        expected = (
            subject <= goal["limit"]
            if goal["op"] == "<="
            else (subject >= goal["limit"])
        )
        assert fig["met"] is expected, fig["name"]

    # --show prints the same figures again from the file, measuring nothing.
    shown = _bench("--show", "--markdown", "--out", str(out), timeout=60)
    assert shown.returncode == 0, shown.stderr
    for fig in figures:
        assert shown.stdout.count(fig["name"]) >= 2, fig["name"]  # text, Markdown


def test_round_breakdown_lists_every_phase_and_what_they_leave_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round record as `grbfl simulate --json` writes it becomes one table row
    whose phases and 'other' add up to the round; peak memory reads /proc."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import memory, rounds
    from bench.report import Figure

    record = {
        "phases": {
            "local_training": 14.2,
            "clustering": 8.7,
            "transfer": 3.1,
            "aggregation": 21.3,
            "evaluation": 0.5,
            "round": 50.0,
        }
    }
    seconds = rounds.phase_seconds(record)
    assert seconds["other"] == pytest.approx(2.2)
    assert sum(seconds[p] for p in (*rounds.PHASES, "other")) == pytest.approx(50.0)
    fig = Figure(rounds.GROUP, "grbfl round", 50.0, "s", 25.0, "centralized")
    fig.detail["phases"] = seconds
    table = rounds.breakdown([fig])
    assert "21.3" in table.splitlines()[1] and table.startswith("strategy")
    lines = rounds.breakdown([fig], markdown=True).splitlines()
    assert len(lines) == 3 and all(line.count("|") == 9 for line in lines)

    assert (memory.peak_kib(os.getpid()) or 0) > 10_000
    assert memory.peak_kib(2**22 + 12345) is None


def test_a_partial_run_keeps_the_other_groups_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m bench --only wire` replaces the wire figures and keeps the rest of
    a results file of the same mode, in figure order; another mode's file is not
    mixed in."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.report import Figure, earlier_figures, machine, write_results

    out = tmp_path / "results.json"
    first = [
        Figure("1 aggregation", "a", 1.0, "s", 2.0, "base"),
        Figure("2 wire", "old wire", 1.0, "s", 2.0, "base"),
        Figure("4 clustering", "c", 3.0, "s", 2.0, "base"),
    ]
    write_results(out, first, mode="full", started=machine())

    kept = earlier_figures(out, "full", {"2 wire"})
    assert [e["name"] for e in kept] == ["a", "c"]
    new = [Figure("2 wire", "new wire", 5.0, "s", 4.0, "base")]
    write_results(out, new, mode="full", started=machine(), earlier=kept)
    figures = json.loads(out.read_text())["figures"]
    assert [f["name"] for f in figures] == ["a", "new wire", "c"]
    assert figures[1]["ratio"] == pytest.approx(1.25)

    assert earlier_figures(out, "quick", {"2 wire"}) == []
    assert earlier_figures(tmp_path / "missing.json", "full", set()) == []


def test_only_refuses_a_file_of_another_mode_and_repeats_no_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--only merges into --out: a file measured in another mode would lose its
    figures, so it is refused before anything is measured; a group named twice is
    measured once, and an --only naming nothing is an error."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.__main__ import parse_args

    out = tmp_path / "results.json"
    out.write_text(json.dumps({"mode": "full", "figures": []}))
    with pytest.raises(SystemExit) as stop:
        parse_args(["--tiny", "--only", "clustering", "--out", str(out)])
    assert stop.value.code == 2
    assert "measured in mode 'full', not 'tiny'" in capsys.readouterr().err

    args = parse_args(["--only", "wire,clustering,wire", "--out", str(out)])
    assert args.groups == ["wire", "clustering"]
    with pytest.raises(SystemExit):
        parse_args(["--only", ",", "--out", str(out)])
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path)])
