"""The daemon's one connection to the broker, kept alive across outages.

Reconnects with exponential backoff and jitter, subscribes again after every
reconnect (clean sessions keep the broker free of state for dead nodes), and
lets callers publish without caring whether the link is up right now.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable

import aiomqtt

from .config import BrokerConfig
from .errors import BrokerError, ConfigError, WireError

log = logging.getLogger(__name__)

# Backoff starts short so a broker restart costs a second, and caps at a minute
# so a Pi waiting out a long broker outage does not hammer it.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0
# A connection that lasts this long counts as healthy and resets the backoff.
STABLE_S = 10.0

Handler = Callable[[str, bytes, bool], Awaitable[None]]


def backoff_delays(first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
    """Endless 'full jitter' delays: uniform in [0, min(cap, first * 2**n)]."""
    attempt = 0
    while True:
        yield random.uniform(0.5, 1.0) * min(cap, first * 2**attempt)
        attempt += 1


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
        self._client: aiomqtt.Client | None = None
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
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.client_id,
            will=will,
            clean_session=True,
            keepalive=self.broker.keepalive,
            tls_context=tls_context,
            timeout=30,
        )

    async def run(self) -> None:
        """Stay connected until cancelled, dispatching every message to handler."""
        delays = backoff_delays()
        connected_at = 0.0
        while True:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    log.info(
                        "%s to broker %s:%d",
                        "reconnected" if self._ever_connected else "connected",
                        self.broker.host,
                        self.broker.port,
                    )
                    self._ever_connected = True
                    connected_at = time.monotonic()
                    self.connected.set()
                    if self.on_connect is not None:
                        asyncio.get_running_loop().create_task(
                            self._guarded(self.on_connect()), name="link-on-connect"
                        )
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            continue
                        self.bytes_in += len(payload)
                        await self._dispatch(
                            message.topic.value, bytes(payload), bool(message.retain)
                        )
            except aiomqtt.MqttError as exc:
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
                    exc,
                    delay,
                    hint,
                )
                self.connected.clear()
                self._client = None
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self._client = None

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
        """Publish once the link is up; retry through reconnects."""
        while True:
            await self.connected.wait()
            client = self._client
            if client is None:
                await asyncio.sleep(0.1)
                continue
            try:
                await client.publish(topic, payload, qos=qos, retain=retain)
                self.bytes_out += len(payload)
                return
            except aiomqtt.MqttError as exc:
                # The run loop notices a dead connection and reconnects; a
                # transient failure on a live one just needs another try.
                log.warning("publish to %s failed (%s); will retry", topic, exc)
                await asyncio.sleep(0.5)

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError as exc:
            raise BrokerError(
                f"no connection to broker {self.broker.host}:{self.broker.port} "
                f"within {timeout:.0f} s"
            ) from exc
