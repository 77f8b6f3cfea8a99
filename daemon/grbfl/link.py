"""The daemon's one connection to the broker, kept alive across outages.

Reconnects with exponential backoff and jitter, subscribes again after every
reconnect (clean sessions keep the broker free of state for dead nodes), and
lets callers publish without caring whether the link is up right now.

It speaks MQTT 5 for two things 3.1.1 cannot say: the largest packet the broker
takes (announced in its CONNACK), so bulk payloads are cut into chunks that fit,
and why the broker closed a connection, so a message refused for its size fails
with an error naming the size instead of being resent after every reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from . import wire
from .config import BrokerConfig
from .errors import BrokerError, BrokerLimitError, ConfigError, WireError

log = logging.getLogger(__name__)

# Backoff starts short so a broker restart costs a second, and caps at a minute
# so a Pi waiting out a long broker outage does not hammer it.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0
# A connection that lasts this long counts as healthy and resets the backoff.
STABLE_S = 10.0

# Bytes a PUBLISH packet adds to its topic and payload: fixed header (5), topic
# length (2), packet id (2), MQTT 5 property length (4), and room for a part
# index that makes a chunk's topic a few digits longer than the first one's.
_PUBLISH_HEADER_BYTES = 24
# Bytes a chunk envelope (wire.split) adds to its data: seven short fields, two
# of them 64-character hex strings, come to about 210.
ENVELOPE_BYTES = 256
# Smallest chunk worth sending; a broker leaving less room is misconfigured.
MIN_PART_BYTES = 1024
# Reason codes of a connection that ended over a message too large: Mosquitto
# disconnects with "Packet too large" (0x95) past its max_packet_size, and
# answers a publish past its message_size_limit with a PUBACK code that paho
# takes for a "Protocol error" (0x82) and disconnects.
_SIZE_REFUSALS = (0x82, 0x95)

# Nagle's algorithm holds a small message back until the broker has acknowledged
# the one before, and the broker delays that acknowledgement by up to 40 ms: every
# order and every answer of a round waited for it (a round trip took 90 ms instead
# of under 1 ms on loopback). Small messages go out at once.
_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

# How long cancel_and_wait gives cancelled tasks before cancelling them again.
CANCEL_RETRY_S = 1.0

# How long a cancelled connection attempt is given to finish, so that what it
# opened can be closed; a TCP connect gives up after paho's 5 s anyway.
_CONNECT_SETTLE_S = 5.0

Handler = Callable[[str, bytes, bool], Awaitable[None]]


class _Client(aiomqtt.Client):
    """aiomqtt's client, made safe to cancel while it connects.

    Cancelled while connecting (a daemon stopping on a start-up error), aiomqtt
    either leaves the socket its worker thread opened and a task of its own, which
    outlive the event loop and fail as "Task was destroyed but it is pending!" and
    "Event loop is closed", or, on Python 3.11, loses the cancel in asyncio.wait_for
    if the broker's CONNACK arrives in the same loop pass, and the link then runs
    on. Shielded, the attempt finishes, is closed, and the cancel goes on.
    """

    async def __aenter__(self) -> _Client:
        attempt = asyncio.ensure_future(super().__aenter__())
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # Let the attempt finish, then close whatever it opened.
            done, _ = await asyncio.wait({attempt}, timeout=_CONNECT_SETTLE_S)
            if not done:
                attempt.cancel()
            elif not attempt.cancelled() and attempt.exception() is None:
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await asyncio.wait_for(
                        super().__aexit__(None, None, None), _CONNECT_SETTLE_S
                    )
            raise
        return self


async def cancel_and_wait(
    tasks: set[asyncio.Task[Any]], retry_s: float = CANCEL_RETRY_S
) -> None:
    """Cancel tasks and wait until each has ended, cancelling again as needed.

    A task can lose a cancel: on Python 3.11, asyncio.wait_for, which aiomqtt uses
    for every broker acknowledgement, drops one that arrives in the same loop pass
    as the acknowledgement, and a task reading messages would then run on forever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    # Collect their outcomes so that none is reported as never retrieved.
    await asyncio.gather(*tasks, return_exceptions=True)


def backoff_delays(first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
    """Endless 'full jitter' delays: uniform in [0, min(cap, first * 2**n)]."""
    attempt = 0
    while True:
        yield random.uniform(0.5, 1.0) * min(cap, first * 2**attempt)
        attempt += 1


def _reason_code(exc: BaseException) -> int | None:
    """The MQTT reason code behind an aiomqtt error, when it carries one."""
    for err in (exc, exc.__cause__):
        rc = getattr(err, "rc", None)
        if rc is not None:
            return int(getattr(rc, "value", rc))
    return None


@dataclass
class _Connection:
    """One connection to the broker, from its CONNACK until it ends."""

    client: aiomqtt.Client
    # The largest packet the broker takes, from its CONNACK; None if unannounced.
    max_packet: int | None
    # Resolves when the connection ends, with its reason code (None if unknown)
    # and the size of the largest message then waiting for the broker's answer.
    lost: asyncio.Future[tuple[int | None, int]]
    inflight: dict[int, int] = field(default_factory=dict)


class Link:
    """A reconnecting MQTT client with a last will and fixed subscriptions."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        subscriptions: list[str],
        handler: Handler,
        *,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.handler = handler
        self.will = will
        self.on_connect = on_connect
        self.connected = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        # Largest packet the broker announced in its latest CONNACK, if any.
        self.max_packet: int | None = None
        # When the latest connection came up (monotonic seconds).
        self.connected_since = 0.0
        self._conn: _Connection | None = None
        # Running on_connect steps, kept so that run() can cancel them on exit:
        # an unreferenced task can be collected mid-publish at shutdown.
        self._on_connect_tasks: set[asyncio.Task[None]] = set()
        self._sends = 0
        self._ever_connected = False
        self._quick_drops = 0

    def _make_client(self) -> aiomqtt.Client:
        tls_context = None
        if self.broker.tls_ca or self.broker.tls_cert:
            try:
                tls_context = ssl.create_default_context(
                    cafile=str(self.broker.tls_ca) if self.broker.tls_ca else None
                )
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"broker.tls_ca = '{self.broker.tls_ca}' is not a usable CA "
                    f"certificate: {exc}"
                ) from exc
            if self.broker.tls_cert and self.broker.tls_key:
                try:
                    tls_context.load_cert_chain(
                        str(self.broker.tls_cert), str(self.broker.tls_key)
                    )
                except (ssl.SSLError, OSError) as exc:
                    raise ConfigError(
                        f"broker.tls_cert / broker.tls_key = '{self.broker.tls_cert}'"
                        f", '{self.broker.tls_key}' are not a usable key pair: {exc}"
                    ) from exc
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will[0], self.will[1], qos=1, retain=True)
        client = _Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.client_id,
            will=will,
            protocol=aiomqtt.ProtocolVersion.V5,
            # With no session expiry, MQTT 5's clean start is 3.1.1's clean session.
            clean_start=True,
            keepalive=self.broker.keepalive,
            tls_context=tls_context,
            timeout=30,
            socket_options=_SOCKET_OPTIONS,
        )
        self._watch_connack(client)
        return client

    def _watch_connack(self, client: aiomqtt.Client) -> None:
        # aiomqtt 2.5 drops the CONNACK's properties; the paho client it wraps
        # hands them to its on_connect callback, so wrap that to read the limit.
        paho = client._client
        inner = paho.on_connect
        assert inner is not None

        def on_connect(*args: Any) -> None:
            properties = args[4] if len(args) > 4 else None
            self.max_packet = getattr(properties, "MaximumPacketSize", None)
            inner(*args)

        paho.on_connect = on_connect

    async def run(self) -> None:
        """Stay connected until cancelled, dispatching every message to handler."""
        try:
            await self._run()
        finally:
            await cancel_and_wait(set(self._on_connect_tasks))

    async def _run(self) -> None:
        delays = backoff_delays()
        connected_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            client = self._make_client()
            self.max_packet = None
            conn: _Connection | None = None
            lost: asyncio.Future[tuple[int | None, int]] = loop.create_future()
            try:
                async with client:
                    self.connected_since = time.monotonic()
                    conn = _Connection(client, self.max_packet, lost)
                    self._conn = conn
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    log.info(
                        "%s to broker %s:%d%s",
                        "reconnected" if self._ever_connected else "connected",
                        self.broker.host,
                        self.broker.port,
                        f" (packets up to {conn.max_packet:,} bytes)"
                        if conn.max_packet
                        else "",
                    )
                    self._ever_connected = True
                    connected_at = time.monotonic()
                    self.connected.set()
                    if self.on_connect is not None:
                        step = loop.create_task(
                            self._guarded(self.on_connect()), name="link-on-connect"
                        )
                        self._on_connect_tasks.add(step)
                        step.add_done_callback(self._on_connect_tasks.discard)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            continue
                        self.bytes_in += len(payload)
                        await self._dispatch(
                            message.topic.value, bytes(payload), bool(message.retain)
                        )
            except aiomqtt.MqttError as exc:
                # Publishers waiting on this connection learn at once that it is
                # gone, and why.
                self._lost(conn, lost, _reason_code(exc))
                # Only a connection that held for a while resets the backoff, so
                # a broker that keeps kicking us out is not hammered.
                if connected_at and time.monotonic() - connected_at > STABLE_S:
                    delays = backoff_delays()
                elif connected_at:
                    self._quick_drops += 1
                connected_at = 0.0
                delay = next(delays)
                hint = ""
                if self._quick_drops >= 3:
                    hint = (
                        f"; dropped right after connecting {self._quick_drops} times: "
                        f"is another device using client id {self.client_id}?"
                    )
                log.warning(
                    "broker %s:%d unreachable (%s); retrying in %.1f s%s",
                    self.broker.host,
                    self.broker.port,
                    exc.__cause__ or exc,
                    delay,
                    hint,
                )
                await asyncio.sleep(delay)
            finally:
                self._lost(conn, lost, None)

    def _lost(
        self,
        conn: _Connection | None,
        lost: asyncio.Future[tuple[int | None, int]],
        reason: int | None,
    ) -> None:
        self.connected.clear()
        self._conn = None
        if not lost.done():
            largest = max(conn.inflight.values(), default=0) if conn else 0
            lost.set_result((reason, largest))

    async def _guarded(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("on-connect step failed")

    async def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        log.debug("message on %s (%d bytes): %r", topic, len(payload), payload[:80])
        try:
            await self.handler(topic, payload, retained)
        except WireError as exc:
            log.warning("ignored message on %s: %s", topic, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler failed for a message on %s", topic)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1
    ) -> None:
        """Publish once the link is up; retry through reconnects.

        A message larger than the broker takes raises BrokerLimitError instead of
        being resent after every reconnect: before it is sent when the broker
        announced its packet limit, or once the broker closed the connection over
        it (Mosquitto's message_size_limit, which no client is told).
        """
        size = len(payload)
        while True:
            await self.connected.wait()
            conn = self._conn
            if conn is None:
                await asyncio.sleep(0.1)
                continue
            packet = size + len(topic.encode()) + _PUBLISH_HEADER_BYTES
            if conn.max_packet is not None and packet > conn.max_packet:
                raise BrokerLimitError(
                    f"a {packet:,}-byte message on {topic} is over the broker's "
                    f"maximum packet size of {conn.max_packet:,} bytes",
                    size=packet,
                    limit=conn.max_packet,
                )

            # Wait for the broker's answer or the end of the connection, whichever
            # comes first: aiomqtt would wait out its whole timeout on a dead one.
            self._sends += 1
            token = self._sends
            conn.inflight[token] = size
            sending: asyncio.Future[Any] = asyncio.ensure_future(
                conn.client.publish(topic, payload, qos=qos, retain=retain)
            )
            try:
                await asyncio.wait(
                    (sending, conn.lost), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                del conn.inflight[token]
                if not sending.done():
                    sending.cancel()
            error = None
            if sending.done() and not sending.cancelled():
                error = sending.exception()
                if error is None:
                    self.bytes_out += size
                    return
                if not isinstance(error, aiomqtt.MqttError):
                    raise error

            if conn.lost.done():
                reason, largest = conn.lost.result()
                if reason in _SIZE_REFUSALS and size >= largest:
                    raise BrokerLimitError(
                        f"the broker closed the connection over a {size:,}-byte "
                        f"message on {topic} (reason code 0x{reason:02x}): it is "
                        "over the broker's message size limit",
                        size=size,
                        limit=None,
                    )
                continue  # sent again once the link is back
            # A transient failure on a live connection just needs another try.
            log.warning("publish to %s failed (%s); will retry", topic, error)
            await asyncio.sleep(0.5)

    def part_bytes(self, topic: str) -> int:
        """Data bytes per chunk of a bulk payload on topic: broker.chunk_bytes,
        cut down to fit the packet limit of the broker connected now."""
        chunk = self.broker.chunk_bytes
        conn = self._conn
        if conn is None or conn.max_packet is None:
            return chunk
        room = (
            conn.max_packet
            - len(topic.encode())
            - _PUBLISH_HEADER_BYTES
            - ENVELOPE_BYTES
        )
        if room < MIN_PART_BYTES:
            raise BrokerLimitError(
                f"the broker's maximum packet size of {conn.max_packet:,} bytes "
                f"leaves room for chunks of {max(room, 0):,} bytes on {topic}; "
                f"grbfl needs at least {MIN_PART_BYTES:,}",
                size=MIN_PART_BYTES + conn.max_packet - room,
                limit=conn.max_packet,
            )
        return min(chunk, room)

    async def publish_bulk(
        self,
        topic_of: Callable[[int], str],
        body: bytes,
        *,
        xfer: str,
        retain: bool = False,
    ) -> int:
        """Publish body in chunks (wire.split) that fit the broker; return how many.

        Part i goes to topic_of(i). The chunks are cut once the link is up, to the
        broker's packet limit; a reconnect that brings a smaller limit halfway
        makes the whole body go again, cut smaller, under the same transfer id.
        """
        while True:
            await self.connected.wait()
            parts = wire.split(body, self.part_bytes(topic_of(0)), xfer=xfer)
            try:
                for i, part in enumerate(parts):
                    await self.publish(topic_of(i), part, retain=retain)
                return len(parts)
            except BrokerLimitError as exc:
                if exc.limit is None:
                    raise
                log.info(
                    "broker now takes packets up to %d bytes; sending %s again in "
                    "smaller chunks",
                    exc.limit,
                    topic_of(0),
                )

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError as exc:
            raise BrokerError(
                f"no connection to broker {self.broker.host}:{self.broker.port} "
                f"within {timeout:.0f} s"
            ) from exc
