"""systemd readiness, status and watchdog notifications.

The daemon runs as a ``Type=notify`` unit with ``WatchdogSec=``: it says READY once it
can serve, keeps a one-line STATUS that ``systemctl status grbfl`` shows, and pings the
watchdog from the event loop, so a loop blocked by heavy work gets the process
restarted. Outside systemd (a terminal, ``grbfl simulate``, the tests) every call is a
cheap no-op.

systemd-python (the optional ``systemd`` extra) does the sending when it is installed;
otherwise the datagram goes to ``$NOTIFY_SOCKET`` directly, which is all sd_notify does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

_LOGGER = logging.getLogger(__name__)

try:
    from systemd import (  # type: ignore[attr-defined,import-not-found]
        daemon as _sd_daemon,
    )
except ImportError:  # the optional extra is not installed: send datagrams ourselves
    _sd_daemon = None

# systemd reads at most this many bytes of STATUS= for display; a longer text is only
# cut there, so we cut it here and keep datagrams small.
STATUS_MAX_CHARS = 512


class Notifier:
    """Tells systemd about the daemon's life cycle; silent when not under systemd.

    ``environ`` exists for tests; the daemon uses the process environment. When it is
    given, or ``use_library`` is false, the fallback sender is used even if
    systemd-python is installed, because the library only reads ``os.environ``.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, use_library: bool = True
    ) -> None:
        env = os.environ if environ is None else environ
        self._env = env
        self._address: str | bytes | None = None
        self._send: Callable[[str], bool]
        if _sd_daemon is not None and use_library and environ is None:
            self.enabled: bool = bool(env.get("NOTIFY_SOCKET"))
            self._send = _library_send
        else:
            self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
            self.enabled = self._address is not None
            self._send = self._datagram_send
        self._sock: socket.socket | None = None
        self._warned = False

    def ready(self, status: str = "") -> None:
        """Report that start-up finished; systemd then considers the unit started."""
        self._notify("READY=1", status)

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status``."""
        self._notify(None, text)

    def watchdog(self) -> None:
        """Ping the watchdog; call it at least every :meth:`watchdog_interval`."""
        self._notify("WATCHDOG=1", None)

    def stopping(self) -> None:
        """Report that a clean shutdown began (a checkpoint may still be written)."""
        self._notify("STOPPING=1", None)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the watchdog timeout), or None without one.

        Mirrors sd_watchdog_enabled(): ``WATCHDOG_USEC`` sets the timeout, and when
        ``WATCHDOG_PID`` is set the watchdog belongs to that process only, so a child
        that inherited the environment does not take over the pinging.
        """
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000

    async def feed_watchdog(self) -> None:
        """Ping the watchdog forever from the event loop; returns at once without one.

        Run it as a named task: the pings stop when the loop stops turning, which is
        exactly what the watchdog is meant to catch.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Release the fallback socket, if one was opened."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _notify(self, state: str | None, status: str | None) -> None:
        """Build one message from a state line and an optional status, then send it."""
        if not self.enabled:
            return
        lines = [state] if state else []
        if status:
            # A newline would start a new KEY=VALUE assignment inside the message.
            flat = " ".join(status.split())[:STATUS_MAX_CHARS]
            lines.append(f"STATUS={flat}")
        if not lines:
            return
        try:
            sent = self._send("\n".join(lines))
        except OSError as exc:
            sent = False
            reason: object = exc
        else:
            reason = "the notification was not delivered"
        if not sent and not self._warned:
            self._warned = True
            _LOGGER.warning(
                "cannot notify systemd at %s (%s); further failures are not logged",
                self._env.get("NOTIFY_SOCKET"),
                reason,
            )

    def _datagram_send(self, message: str) -> bool:
        """Send one datagram to the notify socket without ever blocking the loop."""
        assert self._address is not None
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # A full receive queue must not stall the event loop: the send fails
            # instead, and the next ping tries again.
            self._sock.setblocking(False)
        self._sock.sendto(message.encode("utf-8"), self._address)
        return True


def _library_send(message: str) -> bool:
    """Send through systemd-python, which returns False when nothing was sent."""
    assert _sd_daemon is not None
    return bool(_sd_daemon.notify(message))


def _socket_address(value: str) -> str | bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a socket address, or None when unusable.

    A leading '@' names a socket in the abstract namespace, whose address starts with a
    NUL byte. Other schemes (vsock, used by systemd in VMs) need systemd-python.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    if value:
        _LOGGER.warning("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None
