"""Figure 6: where the time of a round goes, for each strategy.

Each strategy runs one round of `grbfl simulate` (the command as a user runs it:
three participant processes and an aggregator through a private Mosquitto) on a
few thousand CIFAR-10 training images and the whole test set, with the default
settings except one server epoch (``SERVER_EPOCHS``). The seconds per phase are
what the aggregator records in its metrics:

* local training, clustering (embedding included) and transfer: the slowest
  participant's, summed over the phases of the round;
* aggregation: averaging, merging, and training on samples of the merged balls;
* evaluation: the new global model on the test set.

``other`` is the rest of the round: announcing, waiting, status traffic. The
figure's value is the whole round; its baseline is the centralized round on the
same images (one process training on all of them, then the same evaluation).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench.context import Context
from bench.report import Figure

GROUP = "6 rounds"
STRATEGIES = ("centralized", "fedavg", "grbfl", "balls")
PHASES = ("local_training", "clustering", "transfer", "aggregation", "evaluation")
PARTICIPANTS = 3
# One pass over the samples drawn from the merged balls instead of the default
# five: at five, the balls round alone took ten minutes here. Aggregation time of
# balls and grbfl grows in proportion (strategy.server_epochs).
SERVER_EPOCHS = 1
# A one-round simulation that takes longer than this has hung.
_TIMEOUT_S = 3600


def simulate(ctx: Context, strategy: str, limit: int) -> dict[str, Any]:
    """One round of one strategy; the aggregator's (or reference's) record of it."""
    workdir = ctx.scratch(f"rounds-{strategy}")
    out = workdir / "result.json"
    command = [
        sys.executable,
        "-m",
        "grbfl",
        "simulate",
        "--strategy",
        strategy,
        "--participants",
        str(PARTICIPANTS),
        "--rounds",
        "1",
        "--limit",
        str(limit),
        "--json",
        str(out),
        "--workdir",
        str(workdir / "federation"),
    ]
    if ctx.data is not None and ctx.mode != "tiny":
        command += ["--data", str(ctx.data / "train")]
        command += ["--test-data", str(ctx.data / "test")]
    command += ["--server-epochs", str(SERVER_EPOCHS)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"grbfl simulate --strategy {strategy} failed:\n{done.stdout[-2000:]}"
            f"\n{done.stderr[-2000:]}"
        )
    result = json.loads(out.read_text())
    record: dict[str, Any] = dict(result["rounds"][-1])
    metrics = workdir / "federation" / "aggregator" / "metrics.jsonl"
    if metrics.exists():
        lines = [line for line in metrics.read_text().splitlines() if line]
        record["metrics"] = json.loads(lines[-1])
    return record


def phase_seconds(record: dict[str, Any]) -> dict[str, float]:
    """The phases of a round record, with ``other`` for what they leave out."""
    phases = record.get("phases", {})
    seconds = {name: float(phases.get(name, 0.0)) for name in PHASES}
    total = float(phases.get("round", record.get("seconds", 0.0)))
    seconds["other"] = max(0.0, total - sum(seconds.values()))
    seconds["round"] = total
    return seconds


def run(ctx: Context) -> list[Figure]:
    limit = ctx.pick(full=3000, quick=1500, tiny=300)
    records = {}
    for strategy in STRATEGIES:
        ctx.say(f"rounds: one {strategy} round on {limit} images")
        records[strategy] = simulate(ctx, strategy, limit)
    reference = phase_seconds(records["centralized"])["round"]
    figures = []
    for strategy in STRATEGIES:
        seconds = phase_seconds(records[strategy])
        metrics = records[strategy].get("metrics", {})
        extra = {
            key: metrics[key]
            for key in ("merge_s", "server_train_s", "bytes_up", "bytes_down")
            if key in metrics
        }
        figures.append(
            Figure(
                GROUP,
                f"{strategy} round, {limit} images",
                seconds["round"],
                "s",
                reference,
                "centralized round",
                note=f"phases in the breakdown table; {SERVER_EPOCHS} server epoch",
                detail={"phases": seconds, "accuracy": records[strategy]["accuracy"]}
                | extra,
            )
        )
    return figures


def breakdown(figures: list[Figure], *, markdown: bool = False) -> str:
    """The rounds as a table of seconds per phase, one line per strategy."""
    rows = [f for f in figures if f.group == GROUP]
    columns = (*PHASES, "other", "round")
    heads = ("training", "clustering", "transfer", "aggregation", "evaluation")
    header = ("strategy", *heads, "other", "round")
    lines = []
    for fig in rows:
        phases = fig.detail["phases"]
        lines.append((fig.name.split(" ")[0], *(f"{phases[c]:.1f}" for c in columns)))
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in (header, *lines)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *lines)
    )
