"""What every daemon does whatever its role: status, health, watchdog, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .errors import GrbflError
from .health import HeatGuard, read_health
from .link import Link
from .sdnotify import Notifier
from .topics import Topics
from .wire import encode_json

log = logging.getLogger(__name__)

# How long a clean shutdown may spend telling the broker it is going offline.
_GOODBYE_TIMEOUT_S = 5.0


class Node:
    """Shared runtime of the aggregator and participant daemons."""

    role = "node"

    def __init__(self, config: Config, *, exit_when_done: bool = False) -> None:
        self.config = config
        self.node_id = config.node.id
        self.topics = Topics(config.node.federation)
        self.exit_when_done = exit_when_done
        self.state = "idle"
        self.run_id: str | None = None
        self.round = 0
        self.stopping = asyncio.Event()
        self.notifier = Notifier()
        self.heat = HeatGuard(config.health.pause_at_c, config.health.resume_at_c)
        self.too_hot = False
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.link = Link(
            config.broker,
            client_id=f"grbfl-{config.node.federation}-{self.node_id}",
            subscriptions=self.subscriptions(),
            handler=self.on_message,
            will=(self.topics.status(self.node_id), self._status_body("offline")),
            on_connect=self.on_connect,
        )

    # --- hooks for the roles -------------------------------------------------------

    def subscriptions(self) -> list[str]:
        raise NotImplementedError

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        raise NotImplementedError

    async def main(self) -> None:
        """The role's own work; returning ends the daemon."""
        raise NotImplementedError

    async def on_connect(self) -> None:
        await self.publish_status()

    # --- shared behaviour ----------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        path = self.config.state.dir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrbflError(
                f"{self.config.source}: state.dir = '{path}' cannot be created: "
                f"{exc.strerror}"
            ) from exc
        return path

    def _status_body(self, state: str) -> bytes:
        return encode_json(
            {
                "node": self.node_id,
                "role": self.role,
                "state": state,
                "version": __version__,
                "run": self.run_id,
                "round": self.round,
                "pid": os.getpid(),
                "time": time.time(),
            }
        )

    async def set_state(self, state: str) -> None:
        if state != self.state:
            log.debug("state %s -> %s", self.state, state)
        self.state = state
        self.notifier.status(f"{state}; run {self.run_id}; round {self.round}")
        # While the broker is away the state is only recorded: on_connect
        # publishes it, and work such as loading data goes on meanwhile.
        if self.link.connected.is_set():
            await self.publish_status()

    async def publish_status(self) -> None:
        await self.link.publish(
            self.topics.status(self.node_id), self._status_body(self.state), retain=True
        )

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a named background task that shutdown will cancel."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[name] = task
        return task

    async def _health_loop(self) -> None:
        warned = False
        while True:
            health = await asyncio.to_thread(read_health)
            hot = self.heat.update(health.get("temperature_c"))
            if hot != self.too_hot:
                self.too_hot = hot
                if hot:
                    log.warning(
                        "CPU at %.1f C: pausing new work until below %.1f C",
                        health.get("temperature_c"),
                        self.config.health.resume_at_c,
                    )
                else:
                    log.info("CPU cooled to %.1f C: resuming", health["temperature_c"])
            health.update(node=self.node_id, state=self.state, time=time.time())
            if self.link.connected.is_set():
                try:
                    await self.link.publish(
                        self.topics.health(self.node_id), encode_json(health), qos=0
                    )
                except Exception as exc:  # noqa: BLE001 - telemetry must not kill
                    if not warned:
                        log.warning("cannot publish health: %s", exc)
                        warned = True
            await asyncio.sleep(self.config.health.interval_s)

    async def _watchdog_loop(self, interval: float) -> None:
        # Fed from the event loop on purpose: if training ever blocked the loop,
        # systemd would notice and restart us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def serve(self) -> None:
        """Run until main() returns or a signal asks us to stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

        link = self.spawn("link", self.link.run())
        self.spawn("health", self._health_loop())
        interval = self.notifier.watchdog_interval()
        if interval:
            self.spawn("watchdog", self._watchdog_loop(interval))
        main = self.spawn("main", self.main())
        stop = asyncio.ensure_future(self.stopping.wait())
        self.notifier.ready(f"{self.role} {self.node_id} started")
        log.info(
            "%s %s started (federation %s, broker %s:%d)",
            self.role,
            self.node_id,
            self.config.node.federation,
            self.config.broker.host,
            self.config.broker.port,
        )

        try:
            await asyncio.wait({main, stop, link}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            await self.shutdown(main)
        if link.done() and not link.cancelled() and link.exception() is not None:
            raise link.exception()  # type: ignore[misc]

    async def shutdown(self, main: asyncio.Task[Any]) -> None:
        """Cancel background work in one place and say goodbye on the broker."""
        log.info("shutting down")
        self.notifier.stopping()
        self.on_shutdown()
        if not main.done():
            main.cancel()
        try:
            await main
        except asyncio.CancelledError:
            pass
        finally:
            if self.link.connected.is_set():
                self.state = "offline"
                try:
                    await asyncio.wait_for(self.publish_status(), _GOODBYE_TIMEOUT_S)
                except TimeoutError:
                    log.warning("could not publish offline status before exit")
            for name, task in self._tasks.items():
                if name != "main":
                    task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def on_shutdown(self) -> None:
        """Ask worker threads to stop; roles override."""
