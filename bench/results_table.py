"""Print the README's results table from `grbfl simulate --json` files.

.venv/bin/python bench/results_table.py results/cifar-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grbfl.strategy import SERVER_BATCH_SIZE


def main(paths: list[str]) -> None:
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if isinstance(data, dict) and "strategy" in data:  # skip `grbfl balls` sweeps
            runs.append(data)
    # The gap is only meaningful against a centralized run on the same images with
    # the same batch.
    reference = {
        (r["limit"], batch(r)): r["final_accuracy"]
        for r in runs
        if r["strategy"] == "centralized"
    }
    print(
        "| strategy | batch | images | partition | balls per participant | threshold "
        "| final accuracy "
        "| gap to centralized "
        "| MB per round (up + down) | balls sent / after merge | share kept "
        "| wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"centralized": 0, "fedavg": 1, "grbfl": 2, "balls": 3}
    runs.sort(
        key=lambda r: (
            batch(r),
            -(r["limit"] or 10**9),
            r["partition"],
            order.get(r["strategy"], 9),
            r["settings"]["n_clusters"],
            r["settings"]["variance_threshold"],
        )
    )
    for r in runs:
        rounds = r["rounds"]
        mb = sum(x["bytes_up"] + x["bytes_down"] for x in rounds) / len(rounds) / 1e6
        ball_strategy = r["strategy"] in ("grbfl", "balls")
        if r["strategy"] == "balls":
            threshold = f"{r['settings']['variance_threshold']} (pixel)"
        elif r["strategy"] == "grbfl":
            emb = r["settings"].get("embedding_variance_threshold", 0.0)
            threshold = f"{emb} (embedding)"
        else:
            threshold = "-"
        ref = reference.get((r["limit"], batch(r)))
        gap = f"{(r['final_accuracy'] - ref) * 100:+.1f} pt" if ref is not None else "-"
        last = rounds[-1]
        balls = (
            f"{last.get('balls_sent', 0)} / {last.get('balls_after_merge', 0)}"
            if ball_strategy
            else "-"
        )
        share = f"{last.get('share_kept', 0):.0%}" if ball_strategy else "-"
        asked = r["settings"]["n_clusters"] if ball_strategy else "-"
        print(
            f"| {r['strategy']} | {shown_batch(r)} | {r['limit'] or 'all 50,000'} "
            f"| {r['partition']} "
            f"| {asked} | {threshold} "
            f"| {r['final_accuracy']:.4f} | {gap} | {mb:.2f} | {balls} | {share} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )


def batch(run: dict) -> int:
    """The local batch (the centralized run's batch) the run trained with; for
    balls, where only the aggregator trains, its batch (SERVER_BATCH_SIZE)."""
    if run["strategy"] == "balls":
        return SERVER_BATCH_SIZE
    return int(run["settings"]["batch_size"])


def shown_batch(run: dict) -> str:
    if run["strategy"] == "balls":
        return f"- (server {SERVER_BATCH_SIZE})"
    return str(batch(run))


if __name__ == "__main__":
    main(sys.argv[1:])
