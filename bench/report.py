"""One measured figure with its baseline and goal, and how the figures are shown.

Every figure is a value measured on the product and a baseline measured in the same
run on the same input, so that their ratio means something even on a machine that is
busy with other work: contention slows both sides alike, and the ratio is what the
goals are mostly about.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The keys every entry of results.json carries, in this order.
ENTRY_KEYS = (
    "group",
    "name",
    "value",
    "unit",
    "baseline",
    "baseline_name",
    "ratio",
    "goal",
    "met",
    "note",
    "detail",
    "measured",
)


@dataclass(frozen=True)
class Goal:
    """A bound on a figure's value or on its ratio to the baseline."""

    of: str  # "value" or "ratio"
    op: str  # "<=" or ">="
    limit: float
    text: str

    def met_by(self, value: float | None, ratio: float | None) -> bool | None:
        subject = value if self.of == "value" else ratio
        if subject is None or not math.isfinite(subject):
            return None
        return subject <= self.limit if self.op == "<=" else subject >= self.limit


@dataclass
class Figure:
    """One line of the results: the product's value against its baseline."""

    group: str
    name: str
    value: float | None
    unit: str
    baseline: float | None
    baseline_name: str
    goal: Goal | None = None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return self.goal.met_by(self.value, self.ratio) if self.goal else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "goal": asdict(self.goal) if self.goal else None,
            "met": self.met,
            "note": self.note,
            "detail": self.detail,
        }


def best_of(repeats: int, work: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """The shortest wall time of several runs of work(*args), and that run's result.

    The minimum, not the mean: other processes only ever add time, so the fastest
    run is the closest to what the work itself costs.
    """
    best, result = math.inf, None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        outcome = work(*args)
        seconds = time.perf_counter() - started
        if seconds < best:
            best, result = seconds, outcome
    return best, result


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            total_kb = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        total_kb = 0
    return {
        "cores": cores,
        "memory_gib": round(total_kb / 2**20, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    size = abs(value)
    text = (
        f"{value:,.0f}"
        if size >= 100
        else f"{value:.1f}"
        if size >= 10
        else f"{value:.2f}"
        if size >= 1
        else f"{value:.3g}"
    )
    return f"{text} {unit}".strip()


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return (
        f"{ratio:,.0f}"
        if ratio >= 100
        else f"{ratio:.3g}"
        if ratio >= 10
        else (f"{ratio:.3f}")
    )


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[met]


def table(figures: list[Figure]) -> str:
    """The figures as a plain-text table, one line each, grouped as measured."""
    rows = [("figure", "value", "baseline", "ratio", "goal", "met")]
    group = None
    lines: list[tuple[str, ...] | str] = []
    for fig in figures:
        if fig.group != group:
            group = fig.group
            lines.append(f"-- {group}")
        ratio = _ratio(fig.ratio)
        baseline = _number(fig.baseline, fig.unit)
        lines.append(
            (
                fig.name,
                _number(fig.value, fig.unit),
                f"{baseline} ({fig.baseline_name})" if fig.baseline_name else baseline,
                ratio,
                fig.goal.text if fig.goal else "",
                _verdict(fig.met),
            )
        )
    cells = [row for row in (*rows, *lines) if isinstance(row, tuple)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(rows[0]))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()

    out = [fmt(rows[0])]
    out += [line if isinstance(line, str) else fmt(line) for line in lines]
    return "\n".join(out)


def markdown(figures: list[Figure]) -> str:
    """The figures as a Markdown table, for the README."""
    out = [
        "| figure | value | baseline (same run) | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for fig in figures:
        ratio = _ratio(fig.ratio)
        baseline = _number(fig.baseline, fig.unit)
        if fig.baseline_name:
            baseline = f"{baseline} ({fig.baseline_name})"
        out.append(
            f"| {fig.group}: {fig.name} | {_number(fig.value, fig.unit)} | {baseline} "
            f"| {ratio} | {fig.goal.text if fig.goal else ''} | {_verdict(fig.met)} |"
        )
    return "\n".join(out)


def write_results(
    path: Path,
    figures: list[Figure],
    *,
    mode: str,
    started: dict[str, Any],
    earlier: list[dict[str, Any]] | None = None,
) -> None:
    """results.json: one entry per figure, with the machine before and after.

    ``earlier`` entries (of groups not measured this time) are kept, in group order.
    Each entry says when it was measured.
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    entries = [{**fig.as_dict(), "measured": now} for fig in figures]
    assert all(tuple(entry) == ENTRY_KEYS for entry in entries)
    entries = sorted([*(earlier or []), *entries], key=lambda e: _group_order(e))
    document = {
        "created": now,
        "mode": mode,
        "machine_at_start": started,
        "machine_at_end": machine(),
        "figures": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _group_order(entry: dict[str, Any]) -> int:
    """Groups are named '<figure number> <name>'; sort by the number."""
    head = str(entry.get("group", "")).split(" ", 1)[0]
    return int(head) if head.isdigit() else 99


def earlier_figures(path: Path, mode: str, groups: set[str]) -> list[dict[str, Any]]:
    """The entries of ``path`` measured in the same mode, outside ``groups``.

    A run of some groups only (``--only``) keeps the rest of the file; a file of
    another mode, or one that cannot be read, is replaced whole.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(document, dict) or document.get("mode") != mode:
        return []
    entries = document.get("figures")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and e.get("group") not in groups]


def read_figures(path: Path) -> list[Figure]:
    """The figures of a results file, as measured (to print them again)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    return [
        Figure(
            entry["group"],
            entry["name"],
            entry["value"],
            entry["unit"],
            entry["baseline"],
            entry["baseline_name"],
            Goal(**entry["goal"]) if entry["goal"] else None,
            entry["note"],
            entry["detail"],
        )
        for entry in document["figures"]
    ]
