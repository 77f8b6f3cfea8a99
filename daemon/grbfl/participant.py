"""The participant daemon: answers the aggregator's orders with local work."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from . import wire
from .config import Config
from .data import ImageSet, load_image_folder, random_subset
from .errors import BrokerLimitError, DataError, GrbflError, WireError
from .node import Node
from .strategy import LocalData, Order, participant_work

T = TypeVar("T")

log = logging.getLogger(__name__)

# Models kept in memory by digest; two covers "current" and "arriving".
_MODELS_KEPT = 2
# States that describe the work being done, shown in status.
_WORK_STATE = {"train": "training", "embed": "clustering", "balls": "clustering"}


class Participant(Node):
    role = "participant"

    def __init__(self, config: Config, *, exit_when_done: bool = False) -> None:
        super().__init__(config, exit_when_done=exit_when_done)
        self.order: Order | None = None
        self.models: dict[str, dict[str, np.ndarray]] = {}
        self.model_arrival: dict[str, float] = {}
        self.model_reassembler = wire.Reassembler(config.broker.max_payload_bytes)
        self.wake = asyncio.Event()
        self.stop_work = threading.Event()
        # One thread for the heavy work (training, embedding, clustering, encoding
        # the update): glibc gives each thread that allocates its own memory arena,
        # and memory freed by training in one thread was not reused by embedding in
        # another. On one thread a ResNet-18 round peaked at 1.80 to 1.84 GiB of
        # resident memory instead of 2.1 GiB when this was measured (`make bench`,
        # figure 5, which reads 1,687 MB on the current code).
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="grbfl-work")
        self.working_key: tuple[str, int, str] | None = None
        # Last answer per (run, round, phase), republished if the aggregator asks
        # again (after its restart or a retried round) instead of redoing work.
        # Each answer is kept encoded, with its transfer id, so a resend after a
        # broker restart completes a transfer the aggregator got only part of.
        self.answers: dict[tuple[str, int, str], tuple[str, bytes]] = {}
        self.answered_announce: set[str] = set()
        self.data: LocalData | None = None
        # Heat: set when the CPU cools; seconds an order waited for that, sent
        # with the next update so the round's metrics show the time lost.
        self.cooled = asyncio.Event()
        self.heat_lost_s = 0.0
        # Set when the aggregator announces that the run is over.
        self._finished = False
        self._refused_runs: set[str] = set()

    def subscriptions(self) -> list[str]:
        return [self.topics.run, self.topics.model_all]

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.run:
            if not payload:
                return
            body = wire.decode_json(payload)
            if body.get("phase") == "done":
                # Only the end of a run we took part in ends our work; a retained
                # "done" from an earlier run on the same broker must not.
                if self.run_id is not None and body.get("run") == self.run_id:
                    self.order = None
                    self._finished = True
                    self.wake.set()
                return
            order = Order.parse(body)
            if order.classes != self.config.data.classes:
                if order.run not in self._refused_runs:
                    self._refused_runs.add(order.run)
                    log.error(
                        "run %s uses classes %s but data.classes in %s is %s; "
                        "not taking part until they match",
                        order.run,
                        list(order.classes)[:5],
                        self.config.source,
                        list(self.config.data.classes)[:5],
                    )
                return
            self.order = order
            self._finished = False
            if self.working_key is not None and self.working_key != order.key:
                log.info(
                    "aggregator moved on to round %d %s; abandoning %s",
                    order.round,
                    order.phase,
                    self.working_key,
                )
                self.stop_work.set()
            self.wake.set()
        elif topic.startswith(self.topics.base + "/model/"):
            if not payload:
                return
            done = self.model_reassembler.add(payload)
            if done is None:
                return
            digest, body_bytes = done
            download_s = self.model_reassembler.last_seconds
            if digest in self.models:
                return
            body = await asyncio.to_thread(
                wire.decode_cbor,
                body_bytes,
                limit=self.config.broker.max_payload_bytes,
            )
            state = wire.require(body, "state", dict, "model message")
            for name, value in state.items():
                if not isinstance(value, np.ndarray):
                    raise WireError(f"model message: weight {name!r} is not an array")
            self.models[digest] = state
            self.model_arrival[digest] = download_s
            while len(self.models) > _MODELS_KEPT:
                oldest = next(iter(self.models))
                del self.models[oldest]
            log.debug("model %s arrived (%d bytes)", digest[:12], len(body_bytes))
            self.wake.set()

    def on_shutdown(self) -> None:
        self.stop_work.set()
        # Work under way sees stop_work and ends; nothing queued behind it starts.
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def in_worker(self, work: Callable[..., T], *args: Any) -> T:
        """work(*args) on the participant's work thread, without blocking the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, functools.partial(work, *args))

    async def on_heat(self, hot: bool) -> None:
        if not hot:
            self.cooled.set()

    async def _load_data(self) -> LocalData:
        cfg = self.config
        files = None
        if cfg.data.files_list is not None:
            try:
                text = cfg.data.files_list.read_text(encoding="utf-8")
            except OSError as exc:
                raise DataError(
                    f"{cfg.source}: data.files_list = '{cfg.data.files_list}': "
                    f"cannot read: {exc.strerror}"
                ) from exc
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{cfg.source}: data.files_list = '{cfg.data.files_list}': "
                    "not UTF-8 text"
                ) from exc
            files = [line for line in text.splitlines() if line.strip()]
        try:
            images = await asyncio.to_thread(
                load_image_folder,
                self.data_dir(),
                cfg.data.classes,
                files=files,
                cache_dir=self.state_dir / "cache",
            )
        except DataError as exc:
            raise DataError(f"{cfg.source}: data.dir: {exc}") from exc
        # Converting and hashing the images takes seconds for a large folder:
        # off the loop, like the decoding.
        return await asyncio.to_thread(self._local_data, images)

    def _local_data(self, images: ImageSet) -> LocalData:
        cfg = self.config
        if cfg.data.limit and len(images) > cfg.data.limit:
            images = random_subset(images, cfg.data.limit, seed=self.config.model.seed)
        if len(images) == 0:
            raise DataError(f"{cfg.data.dir}: no images to train on")
        counts = np.bincount(images.labels, minlength=len(cfg.data.classes))
        log.info(
            "local data: %d images; per class %s",
            len(images),
            dict(zip(cfg.data.classes, counts.tolist(), strict=True)),
        )
        return LocalData(images.as_float(), images.labels, len(cfg.data.classes))

    async def main(self) -> None:
        if self.config.training.threads:
            torch.set_num_threads(self.config.training.threads)
        await self.set_state("loading")
        self.data = await self._load_data()
        await self.set_state("idle")

        while True:
            await self.wake.wait()
            self.wake.clear()
            if self._finished:
                await self.set_state("idle")
                if self.exit_when_done:
                    log.info("run %s is done; exiting", self.run_id)
                    return
                continue
            order = self.order
            if order is None:
                continue
            if order.announce in self.answered_announce:
                continue
            if order.key in self.answers:
                log.info(
                    "aggregator asked again for round %d %s; resending",
                    order.round,
                    order.phase,
                )
                await self._send(order, self.answers[order.key])
                self.answered_announce.add(order.announce)
                continue
            if order.strategy != "balls" and order.model_digest not in self.models:
                continue  # woken again when the model arrives
            if self.too_hot:
                await self._wait_until_cool(order)
                self.wake.set()
                continue
            await self._do(order)

    async def _wait_until_cool(self, order: Order) -> None:
        """Hold an order while the CPU is too hot, counting the time lost.

        paused-hot tells the aggregator not to wait for this node; the seconds
        held go with the next update, into the round's metrics.
        """
        self.run_id, self.round, self.phase = order.run, order.round, order.phase
        await self.set_state("paused-hot")
        paused = time.monotonic()
        try:
            while self.too_hot:
                self.cooled.clear()
                await self.cooled.wait()
        finally:
            self.heat_lost_s += time.monotonic() - paused
        log.info(
            "round %d %s: resuming after %.1f s paused for heat",
            order.round,
            order.phase,
            self.heat_lost_s,
        )

    async def _do(self, order: Order) -> None:
        assert self.data is not None
        self.run_id, self.round, self.phase = order.run, order.round, order.phase
        self.working_key = order.key
        self.stop_work.clear()
        await self.set_state(_WORK_STATE.get(order.phase, "training"))
        log.info(
            "round %d %s: working (%d samples)",
            order.round,
            order.phase,
            len(self.data.y),
        )
        model_state = self.models.get(order.model_digest or "")
        try:
            body = await self.in_worker(
                participant_work,
                order,
                model_state,
                self.data,
                self.node_id,
                self.state_dir / "cache",
                self.stop_work,
            )
        except Exception as exc:  # noqa: BLE001 - one bad order must not kill us
            # Marked as answered so a retained order that cannot work is not
            # retried in a loop; a new announcement gets a new try.
            self.answered_announce.add(order.announce)
            if isinstance(exc, GrbflError):
                log.error("round %d %s failed: %s", order.round, order.phase, exc)
            else:
                log.exception("round %d %s failed", order.round, order.phase)
            await self.set_state("idle")
            return
        finally:
            self.working_key = None
        if self.stop_work.is_set():
            await self.set_state("idle")
            self.wake.set()
            return

        body.update(
            run=order.run,
            round=order.round,
            phase=order.phase,
            node=self.node_id,
            update_id=uuid.uuid4().hex,
            strategy=order.strategy,
        )
        body["timings"]["download_s"] = self.model_arrival.get(
            order.model_digest or "", 0.0
        )
        body["timings"]["heat_s"] = self.heat_lost_s
        self.heat_lost_s = 0.0
        await self.set_state("uploading")
        encoded = await self.in_worker(wire.encode_cbor, body)
        answer = (uuid.uuid4().hex, encoded)
        self.answers = {order.key: answer}
        start = time.monotonic()
        if await self._send(order, answer):
            log.info(
                "round %d %s: sent %.1f kB in %.2f s",
                order.round,
                order.phase,
                len(encoded) / 1e3,
                time.monotonic() - start,
            )
        self.answered_announce.add(order.announce)
        await self.set_state("idle")
        self.wake.set()

    async def _send(self, order: Order, answer: tuple[str, bytes]) -> bool:
        """Upload an encoded update; False, said in the log, if the broker refuses
        it for its size (it is tried again only when the aggregator asks again)."""
        xfer, encoded = answer
        topic = self.topics.updates(self.node_id)
        try:
            await self.link.publish_bulk(lambda _: topic, encoded, xfer=xfer)
        except BrokerLimitError as exc:
            log.error(
                "round %d %s: cannot send the update of %d bytes: %s; "
                "broker.chunk_bytes in %s is %d: set it below the broker's limit",
                order.round,
                order.phase,
                len(encoded),
                exc,
                self.config.source,
                self.config.broker.chunk_bytes,
            )
            return False
        return True
