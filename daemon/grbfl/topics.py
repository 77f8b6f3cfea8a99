"""Topic names of a federation, in one place (DESIGN.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

ROOT = "grbfl"


@dataclass(frozen=True)
class Topics:
    """The topics under ``grbfl/<federation>/``."""

    federation: str

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.federation}"

    @property
    def all(self) -> str:
        return f"{self.base}/#"

    def status(self, node: str) -> str:
        return f"{self.base}/nodes/{node}/status"

    def health(self, node: str) -> str:
        return f"{self.base}/nodes/{node}/health"

    @property
    def any_status(self) -> str:
        return f"{self.base}/nodes/+/status"

    @property
    def any_health(self) -> str:
        return f"{self.base}/nodes/+/health"

    @property
    def run(self) -> str:
        return f"{self.base}/run"

    def model_part(self, index: int) -> str:
        return f"{self.base}/model/{index}"

    @property
    def model_all(self) -> str:
        return f"{self.base}/model/#"

    def updates(self, node: str) -> str:
        return f"{self.base}/updates/{node}"

    @property
    def any_update(self) -> str:
        return f"{self.base}/updates/+"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    def node_of(self, topic: str) -> str | None:
        """The <node> level of a nodes/... or updates/... topic, else None."""
        parts = topic.split("/")
        if len(parts) >= 4 and parts[2] in ("nodes", "updates"):
            return parts[3]
        return None
