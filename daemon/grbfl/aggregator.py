"""The aggregator daemon: runs the rounds of DESIGN.md section 3."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .alerts import check_round, recorded_accuracy
from .config import Config
from .data import load_image_folder
from .errors import BrokerLimitError, ConfigError, DataError, GrbflError, WireError
from .link import BACKOFF_MAX_S
from .node import Node
from .strategy import Contribution, ServerStrategy, write_atomic
from .weights import load_numpy_state

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.cbor"
# The checkpoint before the latest, kept so that a damaged latest one costs a
# round instead of the run.
PREVIOUS_CHECKPOINT = "checkpoint.prev.cbor"
METRICS = "metrics.jsonl"
# Fault injection for the test suite (tests/test_faults_network.py), never for
# operators: "aggregated:N" makes the aggregator SIGKILL itself right after it
# aggregates round N, "checkpoint:N" halfway through writing round N's checkpoint.
TEST_KILL_AT_ENV = "GRBFL_TEST_KILL_AT"
# Participants whose status says one of these are not waited for.
_ABSENT_STATES = ("offline", "paused-hot")
# Update senders whose partial transfers are tracked at once; bounds memory if a
# misconfigured or hostile client invents node names.
_MAX_SENDERS = 1024
# Unusable update messages named at WARNING per sender before the rest go to
# DEBUG: enough to show what is wrong, too few to flood the journal.
_DROP_WARNINGS = 10
# A health message is a few hundred bytes; anything far bigger is not one, and
# would bloat every metrics record it is copied into.
_MAX_HEALTH_BYTES = 8192


@dataclass
class Peer:
    state: str = "offline"
    # When the node was last heard live (monotonic seconds): a status, health or
    # update message sent now, not one the broker retained from before.
    seen: float = 0.0
    reassembler: wire.Reassembler | None = None
    # Update messages from this sender that could not be used.
    dropped: int = 0


@dataclass
class Collection:
    """The answers gathered for one (round, phase)."""

    round: int
    phase: str
    contributions: dict[str, Contribution] = field(default_factory=dict)
    transfer_s: dict[str, float] = field(default_factory=dict)
    rejected: int = 0
    # Updates delivered again (QoS 1 redelivery, a resend after a reconnect).
    duplicates: int = 0
    # Updates for an earlier round, or for this one after it closed.
    stale: int = 0
    closed: bool = False


def round_lr(base: float, round_: int, rounds: int, decay: str) -> float:
    """The learning rate of one round: a half cosine from base across the run,
    ending above zero so the last round still learns."""
    if decay == "none" or rounds <= 1:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / rounds))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint file; WireError if it is damaged.

    The file holds the checkpoint's CBOR with its SHA-256, so a file cut short or
    altered is caught before any of it is used.
    """
    outer = wire.decode_cbor(path.read_bytes(), limit=1 << 31)
    if isinstance(outer, dict) and "checkpoint" in outer:
        inner = outer["checkpoint"]
        if not isinstance(inner, bytes):
            raise WireError("its contents are not a byte string")
        if outer.get("sha256") != wire.digest_of(inner):
            raise WireError("its SHA-256 does not match its contents")
        saved = wire.decode_cbor(inner, limit=1 << 31)
    else:
        saved = outer  # written before checkpoints carried a digest
    if not isinstance(saved, dict):
        raise WireError("not a checkpoint map")
    return saved


def _test_kill_requested(point: str, round_: int) -> bool:
    return os.environ.get(TEST_KILL_AT_ENV) == f"{point}:{round_}"


class RoundFailed(GrbflError):
    """A round's result was unusable and has been rolled back."""


# Rounds in a row that may fail before the aggregator gives up.
_ROUND_TRIES = 3
# Longest wait between looks at who is present while a round is open.
_RECHECK_S = 5.0


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
            "shape_rank": cfg.strategy.shape_rank,
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
        # Each node's latest health message, copied into every metrics record.
        self.health: dict[str, dict[str, Any]] = {}
        self._warned: set[tuple[str, str]] = set()
        self.collection: Collection | None = None
        self.changed = asyncio.Event()
        self.model_parts = 0
        # What the current phase needs on the broker, kept to publish again after
        # a reconnect: the model (digest, body) and the run message.
        self._model: tuple[str, bytes] | None = None
        self._run_body: dict[str, Any] | None = None
        self._announcing = asyncio.Lock()
        # After a reconnect, how long a node not heard live since counts as there:
        # time for it to reconnect too, and to send a health message.
        self._reconfirm_s = BACKOFF_MAX_S + 2 * config.health.interval_s
        self.test_x: np.ndarray | None = None
        self.test_y: np.ndarray | None = None
        # The last round's test accuracy, to notice a sharp fall.
        self.last_accuracy: float | None = None

    def subscriptions(self) -> list[str]:
        return [self.topics.any_status, self.topics.any_health, self.topics.any_update]

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
            # A retained status may predate a broker restart that lost the node's
            # last will; only a live message shows the node is there now.
            if not retained or not peer.seen:
                peer.seen = time.monotonic()
            self.changed.set()
        elif topic == self.topics.health(node):
            self._heard(node)
            self._on_health(node, payload)
        elif topic == self.topics.updates(node):
            self._heard(node)
            await self._on_update_part(node, payload)

    def _heard(self, node: str) -> None:
        peer = self.peers.get(node)
        if peer is not None:
            peer.seen = time.monotonic()

    def _on_health(self, node: str, payload: bytes) -> None:
        body = wire.decode_json(payload, limit=_MAX_HEALTH_BYTES)
        self.health.pop(node, None)
        self.health[node] = body
        if len(self.health) > _MAX_SENDERS:
            self.health.pop(next(iter(self.health)))

    async def _on_update_part(self, node: str, payload: bytes) -> None:
        # Presence comes from status messages only: a stray update must not make
        # the aggregator wait for a node that never said it was there.
        peer = self.senders.setdefault(node, Peer())
        if len(self.senders) > _MAX_SENDERS:
            self.senders.pop(next(iter(self.senders)))
        if peer.reassembler is None:
            peer.reassembler = wire.Reassembler(self.config.broker.max_payload_bytes)
        try:
            done = peer.reassembler.add(payload)
        except WireError as exc:
            self._drop_update(node, peer, len(payload), exc)
            return
        if done is None:
            return
        _, body_bytes = done
        transfer_s = peer.reassembler.last_seconds
        try:
            body = await asyncio.to_thread(
                wire.decode_cbor, body_bytes, limit=self.config.broker.max_payload_bytes
            )
        except WireError as exc:
            self._drop_update(node, peer, len(body_bytes), exc)
            return
        self._accept(node, body, len(body_bytes), transfer_s)

    def _drop_update(self, node: str, peer: Peer, nbytes: int, exc: WireError) -> None:
        """Log a dropped update message; a sender that keeps sending junk is
        named at WARNING a few times, then at DEBUG."""
        peer.dropped += 1
        level = logging.WARNING if peer.dropped <= _DROP_WARNINGS else logging.DEBUG
        log.log(
            level,
            "dropped %d bytes on %s from sender %s: %s",
            nbytes,
            self.topics.updates(node),
            node,
            exc,
        )
        if peer.dropped == _DROP_WARNINGS:
            log.warning("further messages dropped from %s are logged at DEBUG", node)

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
            or col.closed
        ):
            # A straggler's answer to an earlier round, or to this one after it
            # closed, is normal and must not be mixed in; another run or a future
            # round means a confused node: say so, once.
            if run == self.run_id and col is not None and round_ <= col.round:
                col.stale += 1
                log.info(
                    "round %d %s: ignoring a stale %s for round %d %s (%s)",
                    col.round,
                    col.phase,
                    where,
                    round_,
                    phase,
                    "after it closed"
                    if (round_, phase) == (col.round, col.phase)
                    else "an earlier round",
                )
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
            col.duplicates += 1
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
        """Resume from the newest usable checkpoint; start a new run without one.

        A damaged checkpoint (truncated, altered, unreadable) is set aside and the
        one before it used; a sound one that does not fit the config is an error.
        """
        self._remove_unfinished_writes()
        damaged = False
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = self.state_dir / name
            if not path.exists():
                continue
            try:
                saved = read_checkpoint(path)
            except (WireError, OSError) as exc:
                self._set_aside(path, exc)
                damaged = True
                continue
            done = self._restore(path, saved)
            self._record_missing_metrics(saved, done)
            return done
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        if damaged:
            log.error("no usable checkpoint left: starting a new run %s", self.run_id)
        else:
            log.info("new run %s", self.run_id)
        return 0

    def _restore(self, path: Path, saved: dict[str, Any]) -> int:
        """Load a sound checkpoint into the model; return the round it closed.

        One made under other settings is a ConfigError (exit 78): a restart would
        meet it again, so an operator has to decide whether to move it away.
        """
        source = self.config.source
        try:
            run_id = wire.require(saved, "run", str, str(path))
            done = wire.require(saved, "round", int, str(path))
            strategy = wire.require(saved, "strategy", str, str(path))
            state = wire.check_state(
                saved.get("state"), self.strategy.global_state(), str(path)
            )
        except WireError as exc:
            raise ConfigError(
                f"{source}: checkpoint {path} does not fit this config ({exc}); "
                "move it away to start a new run"
            ) from exc
        if done < 0 or done > self.config.rounds.rounds:
            raise ConfigError(
                f"{source}: checkpoint {path} says round {done}, outside "
                f"rounds.rounds = {self.config.rounds.rounds}; move it away to "
                "start a new run"
            )
        total = saved.get("rounds")
        if isinstance(total, int) and total != self.config.rounds.rounds:
            raise ConfigError(
                f"{source}: checkpoint {path} is of a run of {total} rounds but "
                f"rounds.rounds = {self.config.rounds.rounds} (its learning-rate "
                "schedule spans the rounds); set it back, or move the checkpoint "
                "away to start a new run"
            )
        saved_classes = saved.get("classes")
        if saved_classes is not None and list(saved_classes) != list(self.classes):
            raise ConfigError(
                f"{source}: checkpoint {path} was made for other classes than "
                "data.classes; move it away to start a new run"
            )
        if strategy != self.strategy.name:
            raise ConfigError(
                f"{source}: checkpoint {path} belongs to strategy {strategy!r} but "
                f"strategy.name = {self.strategy.name!r}; move it away to start a "
                "new run"
            )
        load_numpy_state(self.strategy.model, state)
        self.run_id = run_id
        log.info("resuming run %s after round %d from %s", run_id, done, path)
        return done

    def _remove_unfinished_writes(self) -> None:
        # write_atomic's temporary files, left by a process killed mid-write.
        for tmp in self.state_dir.glob(f".{CHECKPOINT}.*.tmp"):
            log.warning("removing %s, left by a checkpoint write cut short", tmp)
            tmp.unlink(missing_ok=True)

    def _set_aside(self, path: Path, exc: Exception) -> None:
        # Renamed, not deleted, so it can be looked at; and out of the way, so it
        # is neither used nor rotated into the previous checkpoint's place.
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.error(
            "checkpoint %s is damaged (%s): not used, kept as %s", path, exc, aside
        )

    def _record_missing_metrics(self, saved: dict[str, Any], done: int) -> None:
        """Append the checkpointed round's metrics if a kill came between writing
        the checkpoint and writing them."""
        record = saved.get("metrics")
        if not isinstance(record, dict):
            return
        path = self.state_dir / METRICS
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                old = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(old, dict) and (old.get("run"), old.get("round")) == (
                self.run_id,
                done,
            ):
                return
        self._append_metrics(record)
        log.info("metrics of round %d added from the checkpoint", done)

    def _save_checkpoint(self, round_: int, record: dict[str, Any]) -> None:
        inner = wire.encode_cbor(
            {
                "run": self.run_id,
                "round": round_,
                # The lr schedule spans all rounds: a run is resumed only with the
                # count it was started with.
                "rounds": self.config.rounds.rounds,
                "strategy": self.strategy.name,
                "classes": list(self.classes),
                "model": self.config.model.name,
                "state": self.strategy.global_state(),
                "metrics": record,
                "time": time.time(),
            }
        )
        body = wire.encode_cbor(
            {"format": 2, "sha256": wire.digest_of(inner), "checkpoint": inner}
        )
        path = self.state_dir / CHECKPOINT
        if path.exists():
            os.replace(path, self.state_dir / PREVIOUS_CHECKPOINT)
        if _test_kill_requested("checkpoint", round_):
            # What a kill halfway through write_atomic leaves behind.
            path.with_name(f".{path.name}.{os.getpid()}.tmp").write_bytes(
                body[: len(body) // 2]
            )
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomic(path, body)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        path: Path = self.state_dir / METRICS
        with open(path, "a+b") as fh:
            # A line cut short by a kill must not swallow the next record.
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(json.dumps(record, sort_keys=True).encode() + b"\n")

    # --- outgoing --------------------------------------------------------------------

    async def _publish_model(self, round_: int, phase: str) -> tuple[str, int]:
        # Copying, encoding and hashing a ResNet-18 takes a Pi a good part of a
        # second: off the loop, which must keep answering the broker.
        body, digest = await asyncio.to_thread(self._model_body, round_, phase)
        self._model = (digest, body)
        await self._send_model(digest, body)
        return digest, len(body)

    def _model_body(self, round_: int, phase: str) -> tuple[bytes, str]:
        body = wire.encode_cbor(
            {
                "run": self.run_id,
                "round": round_,
                "phase": phase,
                "model": self.config.model.name,
                "state": self.strategy.global_state(),
            }
        )
        return body, wire.digest_of(body)

    async def _send_model(self, digest: str, body: bytes) -> None:
        try:
            parts = await self.link.publish_bulk(
                self.topics.model_part, body, xfer=digest, retain=True
            )
        except BrokerLimitError as exc:
            raise ConfigError(
                f"{self.config.source}: broker.chunk_bytes = "
                f"{self.config.broker.chunk_bytes}: cannot publish the model of "
                f"{len(body):,} bytes: {exc}; set it below the broker's limit"
            ) from exc
        # Clear retained parts a larger earlier model left behind.
        for i in range(parts, self.model_parts):
            await self.link.publish(self.topics.model_part(i), b"", retain=True)
        self.model_parts = parts

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
        self._run_body = dict(body, settings=dict(self.settings))
        await self.link.publish(self.topics.run, wire.encode_json(body), retain=True)

    async def _announce(
        self, round_: int, phase: str, attempt: int
    ) -> tuple[int, float]:
        """Publish a phase's model and run message; return the model's size and
        the deadline. One at a time with a republish after a reconnect, which
        must not put an older model back between the two."""
        async with self._announcing:
            digest, model_bytes = (None, 0)
            if phase != "balls":
                digest, model_bytes = await self._publish_model(round_, phase)
            deadline = time.time() + self.config.rounds.deadline_s
            await self._publish_run(round_, phase, attempt, deadline, digest)
        return model_bytes, deadline

    async def on_connect(self) -> None:
        await super().on_connect()
        # A broker restarted without persistence has lost the retained run and
        # model, and updates sent while we were away never reached us: put both
        # back, and announce the phase again, so that participants who answered
        # already send their answers again.
        async with self._announcing:
            run = self._run_body
            if run is None:
                return
            if self._model is not None and run["model_digest"] == self._model[0]:
                await self._send_model(*self._model)
            body = dict(run, announce=uuid.uuid4().hex[:12])
            await self.link.publish(
                self.topics.run, wire.encode_json(body), retain=True
            )
        log.info(
            "published round %d %s again after reconnecting", run["round"], run["phase"]
        )

    # --- the rounds ------------------------------------------------------------------

    def _present(self) -> set[str]:
        # A broker restart loses the status and last will of a node that died
        # meanwhile; a node not heard live since the reconnect counts only until
        # it has had time to reconnect and say something.
        since = self.link.connected_since
        if time.monotonic() - since < self._reconfirm_s:
            since = 0.0
        return {
            n
            for n, p in self.peers.items()
            if p.state not in _ABSENT_STATES and p.seen >= since
        }

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
            model_bytes, deadline = await self._announce(round_, phase, attempt)
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
                    col.closed = True
                    return col, model_bytes, attempt
                self.changed.clear()
                try:
                    # Woken by news, and now and then to let presence expire.
                    await asyncio.wait_for(
                        self.changed.wait(),
                        min(_RECHECK_S, max(0.05, deadline - time.time())),
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
                col.closed = True
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
        try:
            data = await asyncio.to_thread(
                load_image_folder, self.data_dir(), self.classes
            )
        except DataError as exc:
            raise DataError(f"{cfg.source}: data.dir: {exc}") from exc
        self.test_x, self.test_y = await asyncio.to_thread(data.as_float), data.labels
        log.info("test set: %d images of %d classes", len(data), len(self.classes))
        done = await asyncio.to_thread(self._load_checkpoint)
        self.round = done
        if done:
            self.last_accuracy = await asyncio.to_thread(
                recorded_accuracy, self.state_dir / METRICS, done
            )
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

        async with self._announcing:
            await self._publish_run(cfg.rounds.rounds, "done", 0, time.time(), None)
        self.phase = None
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
            # Participants holding their work until their CPU cooled down.
            "heat": 0.0,
        }
        nodes: set[str] = set()
        before = self.strategy.global_state()
        for phase in self.strategy.phases:
            self.phase = phase
            await self.set_state("waiting")
            col, model_bytes, attempt = await self._collect(round_, phase)
            parts = list(col.contributions.values())
            nodes.update(col.contributions)
            record["attempts"] += attempt + 1
            record["duplicate_updates"] = (
                record.get("duplicate_updates", 0) + col.duplicates
            )
            record["stale_updates"] = record.get("stale_updates", 0) + col.stale
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
            phase_seconds["heat"] += max(
                (p.timings.get("heat_s", 0.0) for p in parts), default=0.0
            )

            await self.set_state("aggregating")
            info = await asyncio.to_thread(self.strategy.apply, phase, round_, parts)
            phase_seconds["aggregation"] += info.pop("aggregate_s", 0.0)
            record.update(info)
        if _test_kill_requested("aggregated", round_):
            os.kill(os.getpid(), signal.SIGKILL)

        # Evaluate, then make the round durable before anyone hears of it.
        await self.set_state("evaluating")
        t0 = time.perf_counter()
        assert self.test_x is not None and self.test_y is not None
        evaluation = await asyncio.to_thread(
            self.strategy.evaluate, self.test_x, self.test_y
        )
        accuracy, loss = evaluation.accuracy, evaluation.loss
        phase_seconds["evaluation"] = time.perf_counter() - t0
        if not (math.isfinite(loss) and self.strategy.is_finite()):
            # Never checkpoint or publish a broken model: put the last good one
            # back and let the caller run the round again.
            load_numpy_state(self.strategy.model, before)
            raise RoundFailed(f"round {round_} produced a non-finite model")
        phase_seconds["round"] = time.perf_counter() - started
        health = dict(self.health)
        if self.last_health is not None:
            health[self.node_id] = self.last_health
        record.update(
            accuracy=accuracy,
            loss=loss,
            participants=sorted(nodes),
            n_participants=len(nodes),
            seconds=phase_seconds,
            health=health,
            time=time.time(),
        )
        record.update(check_round(round_, evaluation, self.last_accuracy, self.classes))
        self.last_accuracy = accuracy
        # Durable before anyone hears of it; the checkpoint holds the record too,
        # so a kill before the metrics line is written loses nothing.
        await asyncio.to_thread(self._save_checkpoint, round_, record)
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
