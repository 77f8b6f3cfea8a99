"""The systemd notifier, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from grbfl.sdnotify import Notifier

RECEIVE_TIMEOUT_S = 2.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound in tmp_path, standing in for systemd's."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECEIVE_TIMEOUT_S)
    yield path, sock
    sock.close()


def receive_all(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, oldest first."""
    messages = [sock.recv(4096).decode()]
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(RECEIVE_TIMEOUT_S)
    return messages


def test_fallback_delivers_each_life_cycle_message(notify_socket):
    """READY, STATUS, WATCHDOG and STOPPING arrive as separate datagrams."""
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})

    notifier.ready("connected to broker")
    notifier.status("round 3 training")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()

    assert notifier.enabled
    assert receive_all(sock) == [
        "READY=1\nSTATUS=connected to broker",
        "STATUS=round 3 training",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_fallback_reaches_an_abstract_namespace_socket():
    """A NOTIFY_SOCKET starting with '@' addresses the abstract namespace."""
    name = f"grbfl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECEIVE_TIMEOUT_S)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})

        notifier.ready()
        notifier.watchdog()
        notifier.close()

        assert receive_all(sock) == ["READY=1", "WATCHDOG=1"]


def test_process_environment_is_used_by_default(notify_socket, monkeypatch):
    """Without an explicit mapping the notifier reads os.environ, as under systemd."""
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier(use_library=False)

    notifier.stopping()
    notifier.close()

    assert receive_all(sock) == ["STOPPING=1"]


def test_status_text_is_kept_on_one_line(notify_socket):
    """A newline in a status must not smuggle in another KEY=VALUE assignment."""
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})

    notifier.status("paused\nREADY=1")
    notifier.close()

    assert receive_all(sock) == ["STATUS=paused READY=1"]


def test_notifier_is_a_silent_no_op_outside_systemd():
    """Without NOTIFY_SOCKET nothing is sent and no socket is opened."""
    notifier = Notifier({})

    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog()
    notifier.stopping()

    assert not notifier.enabled
    assert notifier._sock is None


def test_send_failure_is_logged_once_and_never_raised(tmp_path, caplog):
    """A vanished notify socket costs one warning, not an exception per ping."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})

    with caplog.at_level(logging.WARNING, logger="grbfl.sdnotify"):
        for _ in range(3):
            notifier.watchdog()
    notifier.close()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(env, expected):
    """WATCHDOG_USEC sets the interval; WATCHDOG_PID keeps it to one process."""
    assert Notifier(env).watchdog_interval() == expected


def test_feed_watchdog_pings_repeatedly_from_the_event_loop(notify_socket):
    """The watchdog task keeps pinging while the loop turns."""
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})

    async def run_briefly() -> None:
        task = asyncio.create_task(notifier.feed_watchdog(), name="watchdog")
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run_briefly())
    notifier.close()

    pings = receive_all(sock)
    assert len(pings) >= 3
    assert set(pings) == {"WATCHDOG=1"}


def test_feed_watchdog_returns_at_once_without_a_watchdog(notify_socket):
    """No WATCHDOG_USEC: the task ends immediately instead of idling forever."""
    path, _sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})

    asyncio.run(asyncio.wait_for(notifier.feed_watchdog(), timeout=1.0))


def test_systemd_python_delivers_through_the_same_socket(notify_socket, monkeypatch):
    """With the [systemd] extra installed, the library path reaches the socket too."""
    pytest.importorskip("systemd.daemon", reason="the optional [systemd] extra")
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()

    notifier.ready("via libsystemd")

    assert receive_all(sock) == ["READY=1\nSTATUS=via libsystemd"]
