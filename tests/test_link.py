"""The broker link survives a broker restart and subscribes again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from grbfl.broker import PrivateBroker
from grbfl.config import BrokerConfig
from grbfl.link import Link, backoff_delays, cancel_and_wait

pytestmark = pytest.mark.broker


def test_backoff_grows_with_jitter_and_stays_capped() -> None:
    delays = backoff_delays(first=1.0, cap=8.0)
    seen = [next(delays) for _ in range(12)]
    assert 0.5 <= seen[0] <= 1.0
    assert max(seen) <= 8.0
    assert seen[5] >= 4.0  # min(cap, 2**5) * 0.5
    assert len(set(seen)) > 6  # jittered, not a fixed ladder


def test_link_resubscribes_after_the_broker_restarts(tmp_path: Path) -> None:
    """Stop Mosquitto under a connected link, start it again on the same port:
    the link reconnects, subscribes again and receives new messages."""
    broker = PrivateBroker(tmp_path / "b").start()
    received: list[bytes] = []
    got = asyncio.Event()

    async def handler(topic: str, payload: bytes, retained: bool) -> None:
        received.append(payload)
        got.set()

    async def scenario() -> None:
        cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=5)
        link = Link(cfg, "t-listener", ["t/#"], handler)
        talker = Link(cfg, "t-talker", [], handler)
        tasks = [asyncio.create_task(link.run()), asyncio.create_task(talker.run())]
        await link.wait_connected(10)
        await talker.wait_connected(10)
        await talker.publish("t/a", b"before")
        await asyncio.wait_for(got.wait(), 10)

        got.clear()
        broker.stop()
        await asyncio.sleep(1.0)
        assert not link.connected.is_set()
        broker.start()
        await link.wait_connected(30)
        await talker.wait_connected(30)
        await talker.publish("t/a", b"after")
        await asyncio.wait_for(got.wait(), 10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()
    assert received == [b"before", b"after"]


def test_a_task_that_loses_a_cancel_is_cancelled_again() -> None:
    """What asyncio.wait_for does to a cancel on Python 3.11 when the awaited reply
    arrives in the same loop pass: the task goes on. cancel_and_wait still ends it,
    where one cancel and an await would wait forever."""

    async def loses_first_cancel() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # lost, as in the wait_for race
        await asyncio.sleep(30)

    async def scenario() -> asyncio.Task[None]:
        task = asyncio.create_task(loses_first_cancel())
        await asyncio.sleep(0)  # let it start
        await asyncio.wait_for(cancel_and_wait({task}, retry_s=0.1), timeout=5)
        return task

    task = asyncio.run(scenario())
    assert task.cancelled()
