"""A private Mosquitto on a free loopback port, for simulations and tests."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from .errors import BrokerError

log = logging.getLogger(__name__)

# Debian installs the broker outside a normal user's PATH.
_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_START_TIMEOUT_S = 10.0


def find_mosquitto() -> str:
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise BrokerError(
        "mosquitto not found; install it (Debian: apt-get install mosquitto) "
        "or pass --broker HOST:PORT"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateBroker:
    """Start `mosquitto` on 127.0.0.1 with a generated config; stop it on exit.

    ``settings`` adds mosquitto.conf lines (e.g. ``{"max_packet_size": 20000}``).
    The broker keeps nothing across a restart (no persistence), and its log,
    ``mosquitto.log`` in workdir, grows across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        settings: dict[str, str | int] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = dict(settings or {})
        self.log_path = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> PrivateBroker:
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        log_file = self.log_path
        extra = "".join(f"{key} {value}\n" for key, value in self.settings.items())
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # stderr, not a file: as root, mosquitto drops to its own user and
            # could not write into our work folder.
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 10000\n"
            # Without it Nagle's algorithm holds each small message to a client
            # back for that client's delayed acknowledgement (up to 40 ms a hop).
            "set_tcp_nodelay true\n" + extra,
            encoding="utf-8",
        )
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        start_offset = self._log.tell()
        self.process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        try:
            self._wait_listening(log_file, start_offset)
        except BaseException:
            # Ctrl-C included: a broker in its own session would outlive us.
            self.stop()
            raise
        return self

    def _wait_listening(self, log_file: Path, start_offset: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = log_file.read_bytes()[start_offset:].decode(errors="replace")
                err = err.strip()
                raise BrokerError(f"mosquitto exited at start: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    # DEBUG: its users (simulate, tests) say where it is.
                    log.debug("private broker on %s:%d", self.host, self.port)
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on port {self.port} in time")

    def stop(self) -> None:
        if self._log is not None:
            self._log.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
