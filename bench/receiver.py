"""The receiving end of the transfer figures, run as its own process.

    python -m bench.receiver mqtt HOST PORT TOPIC COUNT
        subscribe to TOPIC through grbfl's Link, reassemble and verify each transfer
        with grbfl's Reassembler and decode it, as a participant does with a model
    python -m bench.receiver tcp COUNT
        accept COUNT connections on a free loopback port; read from each a length
        (8 bytes) and then that many bytes into one buffer

It prints ``ready [PORT]`` once it can receive, then one JSON line per transfer with
``time.monotonic()`` stamps, which are comparable across processes on one machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

from grbfl import wire
from grbfl.config import BrokerConfig
from grbfl.link import Link

# Bytes read at a time from the raw socket.
_READ = 1 << 20


def _say(record: dict[str, float | int] | str) -> None:
    line = record if isinstance(record, str) else json.dumps(record)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def receive_mqtt(host: str, port: int, topic: str, count: int) -> None:
    """Reassemble, verify and decode count transfers arriving on topic."""
    broker = BrokerConfig(host=host, port=port)
    reassembler = wire.Reassembler(broker.max_payload_bytes)
    finished = asyncio.Event()
    done = 0
    first_part = 0.0

    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        nonlocal done, first_part
        if not payload:
            return
        if not first_part:
            first_part = time.monotonic()
        whole = reassembler.add(payload)
        if whole is None:
            return
        verified = time.monotonic()
        body = await asyncio.to_thread(
            wire.decode_cbor, whole[1], limit=broker.max_payload_bytes
        )
        decoded = time.monotonic()
        _say(
            {
                "first_part": first_part,
                "verified": verified,
                "decoded": decoded,
                "bytes": len(whole[1]),
                "keys": len(body),
            }
        )
        first_part = 0.0
        done += 1
        if done >= count:
            finished.set()

    link = Link(broker, f"bench-receiver-{port}", [topic], on_message)
    task = asyncio.create_task(link.run(), name="receiver-link")
    await link.wait_connected(timeout=30)
    # The subscription is made before `connected` is set, so anything published
    # from now on reaches us.
    _say("ready")
    await finished.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def receive_tcp(count: int) -> None:
    """Receive count length-prefixed bodies, each into one buffer of its size; the
    baseline for moving bytes."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        _say(f"ready {server.getsockname()[1]}")
        for _ in range(count):
            conn, _ = server.accept()
            with conn:
                header = conn.recv(8, socket.MSG_WAITALL)
                first = time.monotonic()
                size = int.from_bytes(header, "big")
                body = bytearray(size)
                view = memoryview(body)
                received = 0
                while received < size:
                    got = conn.recv_into(view[received:], min(_READ, size - received))
                    if not got:
                        break
                    received += got
            _say({"first_part": first, "verified": time.monotonic(), "bytes": received})


def main(argv: list[str]) -> int:
    if argv[:1] == ["mqtt"] and len(argv) == 5:
        asyncio.run(receive_mqtt(argv[1], int(argv[2]), argv[3], int(argv[4])))
        return 0
    if argv[:1] == ["tcp"] and len(argv) == 2:
        receive_tcp(int(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
