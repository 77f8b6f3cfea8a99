"""The aggregator daemon: runs the rounds of DESIGN.md section 3."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .config import Config
from .data import load_image_folder
from .errors import GrbflError, WireError
from .node import Node
from .strategy import Contribution, ServerStrategy, write_atomic
from .weights import load_numpy_state

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.cbor"
METRICS = "metrics.jsonl"
# Participants whose status says one of these are not waited for.
_ABSENT_STATES = ("offline", "paused-hot")
# Update senders whose partial transfers are tracked at once; bounds memory if a
# misconfigured or hostile client invents node names.
_MAX_SENDERS = 1024


@dataclass
class Peer:
    state: str = "offline"
    reassembler: wire.Reassembler | None = None


@dataclass
class Collection:
    """The answers gathered for one (round, phase)."""

    round: int
    phase: str
    contributions: dict[str, Contribution] = field(default_factory=dict)
    transfer_s: dict[str, float] = field(default_factory=dict)
    rejected: int = 0


def round_lr(base: float, round_: int, rounds: int, decay: str) -> float:
    """The learning rate of one round: a half cosine from base across the run,
    ending above zero so the last round still learns."""
    if decay == "none" or rounds <= 1:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / rounds))


class RoundFailed(GrbflError):
    """A round's result was unusable and has been rolled back."""


# Rounds in a row that may fail before the aggregator gives up.
_ROUND_TRIES = 3


class Aggregator(Node):
    role = "aggregator"

    def __init__(self, config: Config, *, exit_when_done: bool = False) -> None:
        super().__init__(config, exit_when_done=exit_when_done)
        cfg = config
        self.settings: dict[str, Any] = {
            "local_epochs": cfg.training.local_epochs,
            "batch_size": cfg.training.batch_size,
            "lr": cfg.training.lr,
            "augment": cfg.training.augment,
            "schedule": "constant" if cfg.training.lr_decay == "cosine" else "cosine",
            "warmup_steps": cfg.training.warmup_steps,
            "n_clusters": cfg.strategy.n_clusters,
            "variance_threshold": cfg.strategy.variance_threshold,
            "embedding_variance_threshold": cfg.strategy.embedding_variance_threshold,
            "min_size": cfg.strategy.min_size,
            "server_samples": cfg.strategy.server_samples,
            "server_epochs": cfg.strategy.server_epochs,
        }
        self.classes = cfg.data.classes
        self.strategy = ServerStrategy(
            cfg.strategy.name,
            cfg.model.name,
            len(self.classes),
            self.settings,
            seed=cfg.model.seed,
        )
        self.peers: dict[str, Peer] = {}
        self.senders: dict[str, Peer] = {}
        self._warned: set[tuple[str, str]] = set()
        self.collection: Collection | None = None
        self.changed = asyncio.Event()
        self.model_parts = 0
        self.test_x: np.ndarray | None = None
        self.test_y: np.ndarray | None = None

    def subscriptions(self) -> list[str]:
        return [self.topics.any_status, self.topics.any_update]

    # --- incoming --------------------------------------------------------------------

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        node = self.topics.node_of(topic)
        if node is None or node == self.node_id:
            return
        if topic == self.topics.status(node):
            if not payload:
                self.peers.pop(node, None)
                return
            body = wire.decode_json(payload)
            if body.get("role") != "participant":
                return
            peer = self.peers.setdefault(node, Peer())
            peer.state = str(body.get("state", "offline"))
            self.changed.set()
        elif topic == self.topics.updates(node):
            await self._on_update_part(node, payload)

    async def _on_update_part(self, node: str, payload: bytes) -> None:
        # Presence comes from status messages only: a stray update must not make
        # the aggregator wait for a node that never said it was there.
        peer = self.senders.setdefault(node, Peer())
        if len(self.senders) > _MAX_SENDERS:
            self.senders.pop(next(iter(self.senders)))
        if peer.reassembler is None:
            peer.reassembler = wire.Reassembler(self.config.broker.max_payload_bytes)
        done = peer.reassembler.add(payload)
        if done is None:
            return
        _, body_bytes = done
        transfer_s = peer.reassembler.last_seconds
        body = await asyncio.to_thread(
            wire.decode_cbor, body_bytes, limit=self.config.broker.max_payload_bytes
        )
        self._accept(node, body, len(body_bytes), transfer_s)

    def _accept(self, node: str, body: Any, nbytes: int, transfer_s: float) -> None:
        where = f"update from {node}"
        col = self.collection
        run = wire.require(body, "run", str, where)
        round_ = wire.require(body, "round", int, where)
        phase = wire.require(body, "phase", str, where)
        claimed = wire.require(body, "node", str, where)
        wire.require(body, "update_id", str, where)
        if claimed != node:
            raise WireError(f"{where}: claims to be from {claimed!r}")
        if (
            col is None
            or run != self.run_id
            or (round_, phase) != (col.round, col.phase)
        ):
            # Late answers to an earlier round are normal after a retry; another
            # run or a future round means a confused node: say so, once.
            if run == self.run_id and col is not None and round_ <= col.round:
                log.debug("ignoring a late %s for round %d %s", where, round_, phase)
            elif (node, run) not in self._warned:
                self._warned.add((node, run))
                log.warning(
                    "ignoring %s for run %s round %d (current: run %s round %s)",
                    where,
                    run,
                    round_,
                    self.run_id,
                    col.round if col else "-",
                )
            return
        if node in col.contributions:
            log.debug("ignoring a repeated %s for round %d", where, round_)
            return
        owner = len(col.contributions)
        try:
            contribution = self.strategy.validate(phase, node, body, owner, nbytes)
        except WireError:
            col.rejected += 1
            raise
        col.contributions[node] = contribution
        col.transfer_s[node] = transfer_s
        log.info(
            "round %d %s: update from %s (%d samples, %.1f kB)",
            round_,
            phase,
            node,
            contribution.samples,
            nbytes / 1e3,
        )
        self.changed.set()

    # --- state on disk ---------------------------------------------------------------

    def _load_checkpoint(self) -> int:
        path = self.state_dir / CHECKPOINT
        if not path.exists():
            self.run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            log.info("new run %s", self.run_id)
            return 0
        try:
            saved = wire.decode_cbor(path.read_bytes(), limit=1 << 31)
            run_id = wire.require(saved, "run", str, str(path))
            done = wire.require(saved, "round", int, str(path))
            strategy = wire.require(saved, "strategy", str, str(path))
            state = wire.check_state(
                saved.get("state"), self.strategy.global_state(), str(path)
            )
        except (WireError, OSError) as exc:
            raise GrbflError(
                f"checkpoint {path} is unreadable ({exc}); move it away to start a "
                "new run"
            ) from exc
        if done < 0 or done > self.config.rounds.rounds:
            raise GrbflError(
                f"checkpoint {path} says round {done}, outside 0.."
                f"{self.config.rounds.rounds}; move it away to start a new run"
            )
        saved_classes = saved.get("classes")
        if saved_classes is not None and list(saved_classes) != list(self.classes):
            raise GrbflError(
                f"checkpoint {path} was made for other classes than data.classes; "
                "move it away to start a new run"
            )
        if strategy != self.strategy.name:
            raise GrbflError(
                f"checkpoint {path} belongs to strategy {strategy!r} but the config "
                f"says {self.strategy.name!r}; move it away to start a new run"
            )
        load_numpy_state(self.strategy.model, state)
        self.run_id = run_id
        log.info("resuming run %s after round %d from %s", run_id, done, path)
        return done

    def _save_checkpoint(self, round_: int) -> None:
        body = wire.encode_cbor(
            {
                "run": self.run_id,
                "round": round_,
                "strategy": self.strategy.name,
                "classes": list(self.classes),
                "model": self.config.model.name,
                "state": self.strategy.global_state(),
                "time": time.time(),
            }
        )
        write_atomic(self.state_dir / CHECKPOINT, body)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        path: Path = self.state_dir / METRICS
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    # --- outgoing --------------------------------------------------------------------

    async def _publish_model(self, round_: int, phase: str) -> tuple[str, int]:
        body = wire.encode_cbor(
            {
                "run": self.run_id,
                "round": round_,
                "phase": phase,
                "model": self.config.model.name,
                "state": self.strategy.global_state(),
            }
        )
        digest = wire.digest_of(body)
        parts = wire.split(body, self.config.broker.chunk_bytes, xfer=digest)
        for i, part in enumerate(parts):
            await self.link.publish(self.topics.model_part(i), part, retain=True)
        # Clear retained parts a larger earlier model left behind.
        for i in range(len(parts), self.model_parts):
            await self.link.publish(self.topics.model_part(i), b"", retain=True)
        self.model_parts = len(parts)
        return digest, len(body)

    async def _publish_run(
        self, round_: int, phase: str, attempt: int, deadline: float, digest: str | None
    ) -> None:
        body = {
            "run": self.run_id,
            "round": round_,
            "rounds": self.config.rounds.rounds,
            "phase": phase,
            "attempt": attempt,
            "announce": uuid.uuid4().hex[:12],
            "deadline": deadline,
            "strategy": self.strategy.name,
            "settings": self.settings,
            "model": self.config.model.name,
            "model_digest": digest,
            "classes": list(self.classes),
            "aggregator": self.node_id,
        }
        await self.link.publish(self.topics.run, wire.encode_json(body), retain=True)

    # --- the rounds ------------------------------------------------------------------

    def _present(self) -> set[str]:
        return {n for n, p in self.peers.items() if p.state not in _ABSENT_STATES}

    async def _wait_for_participants(self) -> None:
        need = self.config.rounds.min_participants
        last_log = 0.0
        timeout = self.config.rounds.start_timeout_s
        started = time.monotonic()
        while len(self._present()) < need:
            if timeout and time.monotonic() - started > timeout:
                raise GrbflError(
                    f"only {len(self._present())} of rounds.min_participants = {need} "
                    f"participants online after rounds.start_timeout_s = {timeout:.0f}"
                )
            if time.monotonic() - last_log > 30:
                log.info(
                    "waiting for participants: %d of %d online",
                    len(self._present()),
                    need,
                )
                last_log = time.monotonic()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 5)
            except TimeoutError:
                pass

    async def _collect(self, round_: int, phase: str) -> tuple[Collection, int, int]:
        """Announce a phase and gather answers; retry until enough arrive."""
        need = self.config.rounds.min_participants
        attempt = 0
        while True:
            self.collection = Collection(round_, phase)
            digest, model_bytes = (None, 0)
            if phase != "balls":
                digest, model_bytes = await self._publish_model(round_, phase)
            deadline = time.time() + self.config.rounds.deadline_s
            await self._publish_run(round_, phase, attempt, deadline, digest)
            log.info(
                "round %d %s started (attempt %d, deadline in %.0f s)",
                round_,
                phase,
                attempt,
                self.config.rounds.deadline_s,
            )
            col = self.collection
            while time.time() < deadline:
                answered = set(col.contributions)
                present = self._present()
                if len(answered) >= need and present <= answered:
                    return col, model_bytes, attempt
                self.changed.clear()
                try:
                    await asyncio.wait_for(
                        self.changed.wait(), max(0.05, deadline - time.time())
                    )
                except TimeoutError:
                    pass
            missing = sorted(self._present() - set(col.contributions))
            if len(col.contributions) >= need:
                log.warning(
                    "round %d %s: deadline passed without %s; closing with %d",
                    round_,
                    phase,
                    ", ".join(missing) or "absent nodes",
                    len(col.contributions),
                )
                return col, model_bytes, attempt
            log.warning(
                "round %d %s: only %d of %d needed participants answered; retrying",
                round_,
                phase,
                len(col.contributions),
                need,
            )
            attempt += 1

    async def main(self) -> None:
        cfg = self.config
        await self.set_state("loading")
        assert cfg.data.dir is not None  # the config check requires it
        data = await asyncio.to_thread(load_image_folder, cfg.data.dir, self.classes)
        self.test_x, self.test_y = data.as_float(), data.labels
        log.info("test set: %d images of %d classes", len(data), len(self.classes))
        done = await asyncio.to_thread(self._load_checkpoint)
        self.round = done
        await self.set_state("idle")
        await self.link.wait_connected(timeout=3600)

        for round_ in range(done + 1, cfg.rounds.rounds + 1):
            self.round = round_
            for _ in range(_ROUND_TRIES):
                await self._wait_for_participants()
                try:
                    await self._run_round(round_)
                    break
                except RoundFailed as exc:
                    log.error("%s; discarded, running it again", exc)
            else:
                raise GrbflError(
                    f"round {round_} failed {_ROUND_TRIES} times in a row; stopping"
                )

        await self._publish_run(cfg.rounds.rounds, "done", 0, time.time(), None)
        await self.set_state("done")
        log.info("run %s finished after %d rounds", self.run_id, cfg.rounds.rounds)
        if not self.exit_when_done:
            await self.stopping.wait()

    async def _run_round(self, round_: int) -> None:
        started = time.perf_counter()
        self.settings["lr"] = round_lr(
            self.config.training.lr,
            round_,
            self.config.rounds.rounds,
            self.config.training.lr_decay,
        )
        record: dict[str, Any] = {
            "run": self.run_id,
            "round": round_,
            "strategy": self.strategy.name,
            "bytes_up": 0,
            "bytes_down": 0,
            "attempts": 0,
        }
        phase_seconds: dict[str, float] = {
            "local_training": 0.0,
            "clustering": 0.0,
            "transfer": 0.0,
            "aggregation": 0.0,
        }
        nodes: set[str] = set()
        before = self.strategy.global_state()
        for phase in self.strategy.phases:
            await self.set_state("waiting")
            col, model_bytes, attempt = await self._collect(round_, phase)
            parts = list(col.contributions.values())
            nodes.update(col.contributions)
            record["attempts"] += attempt + 1
            record["bytes_up"] += sum(p.nbytes for p in parts)
            record["bytes_down"] += model_bytes * len(parts)
            record["samples"] = sum(p.samples for p in parts)
            phase_seconds["local_training"] += max(
                (p.timings.get("train_s", 0.0) for p in parts), default=0.0
            )
            phase_seconds["clustering"] += max(
                (
                    p.timings.get("cluster_s", 0.0) + p.timings.get("embed_s", 0.0)
                    for p in parts
                ),
                default=0.0,
            )
            phase_seconds["transfer"] += max(
                col.transfer_s.values(), default=0.0
            ) + max((p.timings.get("download_s", 0.0) for p in parts), default=0.0)

            await self.set_state("aggregating")
            info = await asyncio.to_thread(self.strategy.apply, phase, round_, parts)
            phase_seconds["aggregation"] += info.pop("aggregate_s", 0.0)
            record.update(info)

        # Evaluate, then make the round durable before anyone hears of it.
        await self.set_state("evaluating")
        t0 = time.perf_counter()
        assert self.test_x is not None and self.test_y is not None
        accuracy, loss = await asyncio.to_thread(
            self.strategy.evaluate, self.test_x, self.test_y
        )
        phase_seconds["evaluation"] = time.perf_counter() - t0
        if not (math.isfinite(loss) and self.strategy.is_finite()):
            # Never checkpoint or publish a broken model: put the last good one
            # back and let the caller run the round again.
            load_numpy_state(self.strategy.model, before)
            raise RoundFailed(f"round {round_} produced a non-finite model")
        await asyncio.to_thread(self._save_checkpoint, round_)
        phase_seconds["round"] = time.perf_counter() - started
        record.update(
            accuracy=accuracy,
            loss=loss,
            participants=sorted(nodes),
            n_participants=len(nodes),
            seconds=phase_seconds,
            time=time.time(),
        )
        await asyncio.to_thread(self._append_metrics, record)
        await self.link.publish(self.topics.metrics, wire.encode_json(record))
        log.info(
            "round %d aggregated: accuracy %.4f, loss %.4f, %d participants, "
            "%.1f MB up, %.1f MB down, %.1f s",
            round_,
            accuracy,
            loss,
            len(nodes),
            record["bytes_up"] / 1e6,
            record["bytes_down"] / 1e6,
            phase_seconds["round"],
        )
