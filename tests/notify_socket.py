"""systemd's notify socket, played by a test: every datagram with its time."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A datagram socket standing in for systemd's; records (time, fields)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(
                line.split("=", 1)
                for line in data.decode(errors="replace").splitlines()
                if "=" in line
            )
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def times_of(self, key: str) -> list[float]:
        """When each message carrying key arrived (monotonic seconds)."""
        with self.lock:
            return [at for at, fields in self.messages if key in fields]

    def values_of(self, key: str) -> list[str]:
        with self.lock:
            return [fields[key] for _, fields in self.messages if key in fields]

    def stop(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.sock.close()
