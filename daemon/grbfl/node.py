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
from .errors import ConfigError, GrbflError
from .health import HealthReader, HeatGuard
from .link import Link, cancel_and_wait
from .sdnotify import Notifier
from .topics import Topics
from .wire import encode_json

log = logging.getLogger(__name__)

# How long a clean shutdown may spend telling the broker it is going offline.
_GOODBYE_TIMEOUT_S = 5.0
# The loop answers the broker's keepalive, the watchdog and health telemetry; a
# callback holding it this long means heavy work ran on it instead of a worker
# thread. A second is far above any legitimate callback and far below the
# keepalive (30 s by default), so a stall is reported before it costs anything.
LOOP_STALL_S = 1.0
# How often the lag monitor wakes: cheap, and fine enough to time a stall.
_LAG_TICK_S = 0.25


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
        # The phase of the round being worked on (train, embed, balls), if any.
        self.phase: str | None = None
        self.stopping = asyncio.Event()
        self.notifier = Notifier()
        self.heat = HeatGuard(config.health.pause_at_c, config.health.resume_at_c)
        self.too_hot = False
        if config.health.temperature_file is not None:
            self.health_reader = HealthReader(
                thermal_file=config.health.temperature_file, sensors=None
            )
        else:
            self.health_reader = HealthReader()
        self.last_health: dict[str, Any] | None = None
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

    async def on_heat(self, hot: bool) -> None:
        """Called when the heat guard trips or clears; roles override."""

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

    def data_dir(self) -> Path:
        """data.dir, checked: a folder missing or unreadable is a ConfigError
        (exit 78), since restarting the daemon cannot bring it back."""
        path = self.config.data.dir
        assert path is not None  # the config check requires it
        where = f"{self.config.source}: data.dir = '{path}'"
        if not path.exists():
            raise ConfigError(f"{where}: no such folder")
        if not path.is_dir():
            raise ConfigError(f"{where}: not a folder")
        try:
            with os.scandir(path):
                pass
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from exc
        if not os.access(path, os.X_OK):
            # Listed but not entered (a `chmod -R 644`): nothing inside can be read.
            raise ConfigError(f"{where}: cannot enter it (no search permission)")
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
                "phase": self.phase,
                "pid": os.getpid(),
                "time": time.time(),
            }
        )

    async def set_state(self, state: str) -> None:
        if state != self.state:
            log.debug("state %s -> %s", self.state, state)
        self.state = state
        self.notifier.status(self.status_line())
        # While the broker is away the state is only recorded: on_connect
        # publishes it, and work such as loading data goes on meanwhile.
        if self.link.connected.is_set():
            await self.publish_status()

    def status_line(self) -> str:
        """One line for `systemctl status`: role, node, state, round, phase, run."""
        parts = [f"{self.role} {self.node_id}: {self.state}"]
        if self.round:
            parts.append(" ".join(filter(None, (f"round {self.round}", self.phase))))
        if self.run_id:
            parts.append(f"run {self.run_id}")
        return ", ".join(parts)

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
            health = await asyncio.to_thread(self.health_reader.read)
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
                await self.on_heat(hot)
            health.update(node=self.node_id, state=self.state, time=time.time())
            self.last_health = health
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

    async def _loop_lag_loop(self) -> None:
        # Wakes every tick and measures how late it woke: lateness is time the
        # loop spent in someone else's callback, unable to answer the broker.
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_LAG_TICK_S)
            lag = loop.time() - before - _LAG_TICK_S
            if lag > LOOP_STALL_S:
                log.warning(
                    "event loop stalled for %.1f s (state %s): something ran on the "
                    "loop that belongs in a worker thread",
                    lag,
                    self.state,
                )

    async def _watchdog_loop(self, interval: float) -> None:
        # Fed from the event loop on purpose: if training ever blocked the loop,
        # systemd would notice and restart us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _ready_when_connected(self) -> None:
        # systemd counts the unit as started only once the broker connection and
        # its subscriptions are up (Link sets connected after subscribing); a
        # broker that stays away past TimeoutStartSec= fails the start.
        await self.link.connected.wait()
        self.notifier.ready(self.status_line())

    async def serve(self) -> None:
        """Run until main() returns or a signal asks us to stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

        self.notifier.status(
            f"{self.role} {self.node_id}: connecting to broker "
            f"{self.config.broker.host}:{self.config.broker.port}"
        )
        link = self.spawn("link", self.link.run())
        self.spawn("ready", self._ready_when_connected())
        self.spawn("health", self._health_loop())
        self.spawn("loop-lag", self._loop_lag_loop())
        interval = self.notifier.watchdog_interval()
        if interval:
            self.spawn("watchdog", self._watchdog_loop(interval))
        main = self.spawn("main", self.main())
        stop = asyncio.ensure_future(self.stopping.wait())
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
            await self._cancel_background()

    async def _cancel_background(self) -> None:
        """Cancel every background task and wait until each has ended."""
        await cancel_and_wait(
            {task for name, task in self._tasks.items() if name != "main"}
        )
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def on_shutdown(self) -> None:
        """Ask worker threads to stop; roles override."""
