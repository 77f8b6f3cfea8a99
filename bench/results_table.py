"""Print the README's results table from `grbfl simulate --json` files.

    .venv/bin/python bench/results_table.py results/cifar-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) | {"file": Path(p).name} for p in paths]
    central = [r for r in runs if r["strategy"] == "centralized"]
    reference = central[0]["final_accuracy"] if central else None
    print(
        "| strategy | partition | threshold | final accuracy | gap to centralized "
        "| MB per round (up + down) | balls sent / after merge | share kept "
        "| wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    order = {"centralized": 0, "fedavg": 1, "grbfl": 2, "balls": 3}
    runs.sort(
        key=lambda r: (
            r["partition"],
            order.get(r["strategy"], 9),
            r["settings"]["variance_threshold"],
        )
    )
    for r in runs:
        rounds = r["rounds"]
        mb = sum(x["bytes_up"] + x["bytes_down"] for x in rounds) / len(rounds) / 1e6
        ball_strategy = r["strategy"] in ("grbfl", "balls")
        threshold = r["settings"]["variance_threshold"] if ball_strategy else "-"
        gap = (
            f"{(r['final_accuracy'] - reference) * 100:+.1f} pt"
            if reference is not None
            else "-"
        )
        last = rounds[-1]
        balls = (
            f"{last.get('balls_sent', 0)} / {last.get('balls_after_merge', 0)}"
            if ball_strategy
            else "-"
        )
        share = f"{last.get('share_kept', 0):.0%}" if ball_strategy else "-"
        print(
            f"| {r['strategy']} | {r['partition']} | {threshold} "
            f"| {r['final_accuracy']:.4f} | {gap} | {mb:.2f} | {balls} | {share} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
