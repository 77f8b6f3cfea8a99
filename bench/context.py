"""What every figure's code gets: the run's size, its data and a scratch folder."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MODES = ("full", "quick", "tiny")

# CIFAR-10 as the developers have it (DESIGN.md section 7); --data overrides it.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


@dataclass
class Context:
    """The run's mode, the CIFAR-10 folder (None when absent) and a scratch folder.

    ``full`` measures every figure at the size the issue names; ``quick`` measures
    each kind once at a smaller size, for development; ``tiny`` only checks that the
    machinery works (the test suite runs it).
    """

    mode: str
    data: Path | None
    workdir: Path
    quiet: bool = False
    started: float = field(default_factory=time.monotonic)

    def pick(self, *, full: T, quick: T, tiny: T) -> T:
        """The setting of the current mode."""
        return {"full": full, "quick": quick, "tiny": tiny}[self.mode]

    def say(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.monotonic() - self.started
            print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
