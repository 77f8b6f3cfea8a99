"""Figure 2: what the wire costs, in bytes and in time.

Bytes: a model and a ball update are published exactly as the aggregator and a
participant publish them (CBOR, chunk envelopes, ``Link.publish_bulk``) to a private
Mosquitto, through a loopback relay that counts every byte of the MQTT connection
both ways while they go: PUBLISH headers, topics and packet ids, the envelopes, the
broker's PUBACKs. TCP/IP framing below MQTT is not counted; it is the same for any
protocol. Baseline: the bytes of the arrays themselves.

Time: a ResNet-18 model body (45 MB) goes from the sender through Mosquitto to a
receiver in another process that reassembles it, checks its digest and decodes it,
with grbfl's Link and Reassembler at both ends. Baseline, in the same run and
alternating with it: the same bytes over one raw loopback TCP connection into a
buffer in the same kind of receiving process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_merge import synthetic_balls
from bench.context import Context
from bench.report import Figure, Goal
from grbfl import wire
from grbfl.balls import BallSettings, ball_bytes, select_balls
from grbfl.broker import PrivateBroker
from grbfl.config import BrokerConfig
from grbfl.link import Link
from grbfl.models import build_model
from grbfl.topics import Topics
from grbfl.weights import state_to_numpy

GROUP = "2 wire"
GOAL_OVERHEAD = Goal("ratio", "<=", 1.02, "ratio <= 1.02")
GOAL_SPEED = Goal("ratio", ">=", 0.5, "ratio >= 0.5")

ROOT = Path(__file__).resolve().parents[1]
# How long a receiver may take to start, or to report one transfer.
_RECEIVER_TIMEOUT_S = 120.0


@dataclass
class CountingProxy:
    """A loopback TCP relay to the broker that counts the bytes going each way."""

    target_port: int
    up: int = 0
    down: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        await asyncio.gather(
            self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down")
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                setattr(self, way, getattr(self, way) + len(data))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def total(self) -> int:
        return self.up + self.down

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    """Senders subscribe to nothing."""


class Sender:
    """A grbfl Link that only publishes, running until closed."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.link = Link(BrokerConfig(host=host, port=port), name, [], _ignore)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Link:
        self._task = asyncio.create_task(self.link.run(), name=self.link.client_id)
        await self.link.wait_connected(timeout=30)
        return self.link

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class Receiver:
    """A `python -m bench.receiver` process and the records it prints."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> Receiver:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.receiver",
            *self.args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        line = await self._line()
        if not line.startswith("ready"):
            raise RuntimeError(f"receiver {self.args[0]} said {line!r}")
        words = line.split()
        self.port = int(words[1]) if len(words) > 1 else 0
        return self

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), _RECEIVER_TIMEOUT_S)
        if not raw:
            raise RuntimeError(f"receiver {self.args[0]} exited early")
        return raw.decode().strip()

    async def record(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self._line())
        return result

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def model_message(model: str) -> tuple[dict[str, Any], int]:
    """The aggregator's model message for a fresh model, and its array bytes."""
    state = state_to_numpy(build_model(model, 10))
    body = {"run": "bench", "round": 1, "phase": "train", "model": model}
    body["state"] = state
    return body, sum(array.nbytes for array in state.values())


def ball_message(count: int) -> tuple[dict[str, Any], int]:
    """A participant's embed-phase update of count ResNet-18 embedding balls."""
    balls = synthetic_balls(1, count)
    _, report = select_balls(balls, 10, BallSettings())
    body = {
        "samples": int(balls.sizes.sum()),
        "timings": {"train_s": 12.5, "embed_s": 3.25, "cluster_s": 1.5},
        "balls": balls.to_arrays(),
        "ball_report": report.as_dict(),
        "run": "bench",
        "round": 1,
        "phase": "embed",
        "node": "p1",
        "update_id": uuid.uuid4().hex,
        "strategy": "grbfl",
    }
    return body, ball_bytes(balls)


async def wire_bytes(
    broker: PrivateBroker, topics: Topics, message: dict[str, Any], model: bool
) -> tuple[int, int]:
    """Bytes on the MQTT connection while one message is published, and parts."""
    proxy = await CountingProxy(broker.port).start()
    try:
        async with Sender(broker.host, proxy.port, "bench-counted") as link:
            before = proxy.total()
            body = wire.encode_cbor(message)
            if model:
                parts = await link.publish_bulk(
                    topics.model_part, body, xfer=wire.digest_of(body), retain=True
                )
            else:
                topic = topics.updates("p1")
                parts = await link.publish_bulk(
                    lambda _: topic, body, xfer=uuid.uuid4().hex
                )
            return proxy.total() - before, parts
    finally:
        await proxy.stop()


def _send_raw(port: int, body: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(len(body).to_bytes(8, "big"))
        sock.sendall(body)


async def transfer_times(
    broker: PrivateBroker, topics: Topics, message: dict[str, Any], repeats: int
) -> tuple[list[dict[str, float]], list[float], int]:
    """Alternating runs through Mosquitto and over raw TCP; seconds of each."""
    through_broker = []
    raw = []
    size = 0
    async with (
        Receiver(
            "mqtt", broker.host, str(broker.port), topics.model_all, str(repeats)
        ) as mqtt,
        Receiver("tcp", str(repeats)) as tcp,
        Sender(broker.host, broker.port, "bench-sender") as link,
    ):
        for _ in range(repeats):
            started = time.monotonic()
            body = wire.encode_cbor(message)
            encoded = time.monotonic()
            await link.publish_bulk(
                topics.model_part, body, xfer=wire.digest_of(body), retain=True
            )
            sent = time.monotonic()
            got = await mqtt.record()
            size = len(body)
            through_broker.append(
                {
                    "encode_s": encoded - started,
                    "publish_s": sent - encoded,
                    "transport_s": got["verified"] - encoded,
                    "decode_s": got["decoded"] - got["verified"],
                    "total_s": got["decoded"] - started,
                }
            )

            started = time.monotonic()
            await asyncio.to_thread(_send_raw, tcp.port, body)
            got = await tcp.record()
            raw.append(got["verified"] - started)
    return through_broker, raw, size


async def c_clients_time(
    broker: PrivateBroker, body_file: Path, topic: str, repeats: int
) -> list[float] | None:
    """Seconds for Mosquitto's own C clients to move the body as one message: how
    fast this broker moves these bytes at all. None when they are not installed."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    unbuffered = shutil.which("stdbuf")
    if pub is None or sub is None or unbuffered is None:
        return None
    address = ["-h", broker.host, "-p", str(broker.port), "-t", topic, "-q", "1"]
    times = []
    for _ in range(repeats):
        # -d prints SUBACK once the subscription stands (unbuffered, so it arrives
        # at once); the payload follows on the same stream and is drained.
        receiver = await asyncio.create_subprocess_exec(
            unbuffered,
            "-o0",
            sub,
            *address,
            "-C",
            "1",
            "-N",
            "-d",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert receiver.stdout is not None
            seen = b""
            while b"SUBACK" not in seen:
                chunk = await asyncio.wait_for(receiver.stdout.read(4096), 30)
                if not chunk:
                    raise RuntimeError("mosquitto_sub exited before subscribing")
                seen = seen[-16:] + chunk
            drain = asyncio.create_task(_drain(receiver.stdout), name="drain-sub")
            started = time.monotonic()
            sender = await asyncio.create_subprocess_exec(
                pub, *address, "-f", str(body_file), stderr=asyncio.subprocess.DEVNULL
            )
            await sender.wait()
            await asyncio.wait_for(receiver.wait(), _RECEIVER_TIMEOUT_S)
            times.append(time.monotonic() - started)
            await drain
        finally:
            if receiver.returncode is None:
                receiver.kill()
                await receiver.wait()
    return times


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 20):
        pass


def bytes_figure(
    name: str, counted: int, payload: int, parts: int, what: str
) -> Figure:
    """Bytes on the wire for one message against the bytes of its arrays."""
    return Figure(
        GROUP,
        name,
        counted / 1e6,
        "MB",
        payload / 1e6,
        "array bytes",
        GOAL_OVERHEAD,
        note=f"{parts} chunks; {what}",
        detail={"wire_bytes": counted, "payload_bytes": payload, "parts": parts},
    )


async def measure(ctx: Context, broker: PrivateBroker) -> list[Figure]:
    # The timed transfers get topics of their own: the counted model stays
    # retained on the first ones and would reach the receiver as it subscribes.
    topics, timed_topics = Topics("bench"), Topics("bench-timed")
    model = ctx.pick(full="resnet18", quick="resnet18", tiny="cnn")
    figures = []

    # Bytes: one model and one ball update, as published.
    message, payload = model_message(model)
    ctx.say(f"wire: bytes of a {model} model ({payload / 1e6:.1f} MB of arrays)")
    counted, parts = await wire_bytes(broker, topics, message, model=True)
    figures.append(
        bytes_figure(
            f"{model} model on the wire",
            counted,
            payload,
            parts,
            "MQTT bytes both ways (PUBLISH, PUBACK)",
        )
    )
    balls = ctx.pick(full=100, quick=100, tiny=20)
    update, payload = ball_message(balls)
    ctx.say(f"wire: bytes of an update of {balls} balls of 512 dims")
    counted, parts = await wire_bytes(broker, topics, update, model=False)
    figures.append(
        bytes_figure(
            f"ball update, {balls} x 512 dims",
            counted,
            payload,
            parts,
            "with the ball report and round fields",
        )
    )

    # Time: the model through the broker against raw TCP, alternating.
    repeats = ctx.pick(full=3, quick=2, tiny=1)
    ctx.say(f"wire: moving the {model} model, {repeats} times each way")
    runs, raw, size = await transfer_times(broker, timed_topics, message, repeats)
    best = min(runs, key=lambda r: r["transport_s"])
    fastest_raw = min(raw)
    megabytes = size / 1e6
    figures.append(
        Figure(
            GROUP,
            f"{model} model ({megabytes:.1f} MB) through Mosquitto",
            megabytes / best["transport_s"],
            "MB/s",
            megabytes / fastest_raw,
            "raw loopback TCP",
            GOAL_SPEED,
            note=f"best of {repeats}; chunk, publish, broker, reassemble, verify",
            detail={"runs": runs, "raw_s": raw, "bytes": size},
        )
    )
    body_file = ctx.scratch("wire") / "model.cbor"
    body_file.write_bytes(wire.encode_cbor(message))
    c_times = await c_clients_time(broker, body_file, "bench/c-clients", repeats)
    if c_times is not None:
        figures.append(
            Figure(
                GROUP,
                "  same bytes, mosquitto_pub to mosquitto_sub",
                megabytes / min(c_times),
                "MB/s",
                megabytes / fastest_raw,
                "raw loopback TCP",
                note=f"best of {repeats}; Mosquitto's C clients, one message: "
                "what this broker allows at all",
                detail={"seconds": c_times},
            )
        )
    whole = min(r["total_s"] for r in runs)
    figures.append(
        Figure(
            GROUP,
            "  the same with CBOR encode and decode",
            megabytes / whole,
            "MB/s",
            megabytes / fastest_raw,
            "raw loopback TCP",
            note=f"best of {repeats}; state dict in, state dict out",
            detail={
                "encode_s": float(np.min([r["encode_s"] for r in runs])),
                "decode_s": float(np.min([r["decode_s"] for r in runs])),
            },
        )
    )
    return figures


def run(ctx: Context) -> list[Figure]:
    with PrivateBroker(ctx.scratch("wire-broker")) as broker:
        return asyncio.run(measure(ctx, broker))
