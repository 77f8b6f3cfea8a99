"""Issue 5, cases 9 to 15: bad data, hostile bytes and blocking work.

Real files (made with PIL in tmp_path), a real Mosquitto and real daemons: the
federations here run an aggregator and its participants in this process, on one
event loop, so that the code under test can be watched from inside; the hostile
CBOR test runs the aggregator as its own process, to measure its memory.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import shutil
import struct
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest
from PIL import Image, ImageFile

from grbfl import alerts, data, strategy, wire
from grbfl.aggregator import Aggregator
from grbfl.balls import BallSettings, build_balls
from grbfl.broker import PrivateBroker
from grbfl.config import Config, config_from_dict, dump_toml
from grbfl.data import (
    BACKGROUND,
    DIGIT_CLASSES,
    IMAGE_SIZE,
    discover_classes,
    list_images,
    load_image_folder,
)
from grbfl.errors import WireError
from grbfl.models import CNN_WIDTHS, build_model
from grbfl.node import LOOP_STALL_S, Node
from grbfl.participant import Participant
from grbfl.simulate import FEDERATION as SIM_FEDERATION
from grbfl.simulate import SimOptions, prepare, read_metrics
from grbfl.strategy import ServerStrategy
from grbfl.training import Evaluation, TrainSettings, assess, train
from grbfl.weights import load_numpy_state, state_to_numpy

FEDERATION = "faults"
RED = (200, 30, 40)
GREEN = (20, 180, 60)
COLOURS = ("red", "green", "blue")


# --- helpers: daemons in this process ------------------------------------------------


def node_config(
    tmp_path: Path,
    broker: PrivateBroker,
    role: str,
    node: str,
    data_dir: Path,
    classes: tuple[str, ...],
    **sections: dict[str, Any],
) -> Config:
    """A validated config for one daemon of a small, quick federation."""
    raw: dict[str, Any] = {
        "node": {"role": role, "id": node, "federation": FEDERATION},
        "broker": {"host": broker.host, "port": broker.port, "keepalive": 30},
        "data": {"dir": str(data_dir), "classes": list(classes)},
        "model": {"name": "cnn", "seed": 0},
        "training": {
            "local_epochs": 1,
            "batch_size": 16,
            "lr": 0.02,
            "augment": False,
            "warmup_steps": 0,
        },
        "rounds": {"rounds": 1, "deadline_s": 300.0, "min_participants": 1},
        "strategy": {
            "name": "fedavg",
            "n_clusters": 10,
            "min_size": 5,
            "variance_threshold": 0.0,
            "server_samples": 200,
            "server_epochs": 1,
        },
        "health": {"pause_at_c": 150.0, "resume_at_c": 140.0, "interval_s": 30.0},
        "state": {"dir": str(tmp_path / "state" / node)},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return config_from_dict(raw, source=f"<{node}>")


def run_in_process(configs: list[Config], timeout_s: float = 300.0) -> None:
    """Run the daemons on one event loop until the aggregator's run is done."""

    async def federation() -> None:
        nodes: list[Node] = [
            Aggregator(c, exit_when_done=True)
            if c.node.role == "aggregator"
            else Participant(c, exit_when_done=True)
            for c in configs
        ]
        await asyncio.wait_for(asyncio.gather(*(n.serve() for n in nodes)), timeout_s)

    asyncio.run(federation())


def metrics_of(aggregator: Config) -> list[dict[str, Any]]:
    return read_metrics(aggregator.state.dir)


def solid_test_set(root: Path, per_class: int = 3) -> Path:
    """A small test folder of red, green and blue images."""
    colours = {"red": RED, "green": GREEN, "blue": (30, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(min(255, c + 10 * i) for c in colour)
            Image.new("RGB", (32, 32), shade).save(root / name / f"{i}.png")
    return root


def copy_digits(source: Path, dest: Path, counts: dict[str, int]) -> Path:
    """A folder holding the first counts[c] digit images of each class c."""
    for name, count in counts.items():
        (dest / name).mkdir(parents=True)
        for path in sorted((source / name).iterdir())[:count]:
            shutil.copy(path, dest / name / path.name)
    return dest


# --- case 9: codec round trip ---------------------------------------------------------


WIRE_DTYPES = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
]


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(9)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "f":
        values = rng.standard_normal(shape) * 1000
        values.flat[:3] = [-0.0, np.finfo(dtype).tiny, np.finfo(dtype).max]
        return values.astype(dtype)
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values.flat[:2] = [info.min, info.max]
    return values


def _round_trip(body: Any) -> Any:
    return wire.decode_cbor(wire.encode_cbor(body), limit=1 << 30)


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_arrays_of_every_wire_dtype_come_back_with_dtype_shape_and_bytes(
    dtype: str,
) -> None:
    """Extremes included (min, max, -0.0, the smallest normal float)."""
    array = _sample(dtype, (3, 4, 5))
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    strided = array[:, ::2, 1:]

    back = _round_trip({"a": array, "be": big_endian, "strided": strided})

    assert back["a"].dtype == array.dtype and back["a"].shape == array.shape
    assert back["a"].tobytes() == array.tobytes()
    assert back["be"].dtype == array.dtype  # native order on arrival, same values
    assert back["be"].tobytes() == array.tobytes()
    assert back["strided"].tobytes() == np.ascontiguousarray(strided).tobytes()


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_numpy_scalars_come_back_with_their_dtype_and_bytes(dtype: str) -> None:
    """np.float64 is a Python float and np.bool_ is not a bool: neither may turn
    into a plain CBOR number or lose its width on the way."""
    scalar = _sample(dtype, (1,))[0]
    assert isinstance(scalar, np.generic)

    back = _round_trip({"s": scalar})["s"]

    assert back.dtype == scalar.dtype and back.shape == ()
    assert back.tobytes() == scalar.tobytes()


def test_named_scalars_keep_their_dtype() -> None:
    """The issue's own examples: np.float32(1.5) and an int64 beyond 2**53."""
    back = _round_trip({"f": np.float32(1.5), "i": np.int64(2**53 + 1)})

    assert back["f"].dtype == np.float32 and float(back["f"]) == 1.5
    assert back["i"].dtype == np.int64 and int(back["i"]) == 2**53 + 1


@pytest.mark.parametrize("model_name", ["cnn", "resnet18"])
def test_model_states_and_balls_survive_the_wire_bit_for_bit(
    model_name: str, digits_dirs: tuple[Path, Path]
) -> None:
    """Every array a model or a ball set holds, through the codec: exact, and of
    a dtype the wire carries."""
    state = state_to_numpy(build_model(model_name, 10))
    images = load_image_folder(digits_dirs[1], DIGIT_CLASSES)
    flat = images.as_float()[:200].reshape(200, -1)
    _, kept, _ = build_balls(flat, images.labels[:200], 10, BallSettings(20, 0.0, 2))
    body = {"state": state, "balls": kept.to_arrays()}

    back = _round_trip(body)

    sent = dict(wire.iter_arrays(body))
    received = dict(wire.iter_arrays(back))
    assert sent.keys() == received.keys()
    for path, array in sent.items():
        got = received[path]
        assert (got.dtype, got.shape) == (array.dtype, array.shape), path
        assert got.tobytes() == array.tobytes(), path
    assert {a.dtype.name for a in sent.values()} <= set(WIRE_DTYPES)


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((2, 2), np.complex64),
        np.array([object()], dtype=object),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
        np.array(["text"]),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
        np.complex128(1j),
        np.datetime64("2024-01-01"),
    ],
    ids=lambda v: str(v.dtype),
)
def test_unsupported_dtype_is_refused_naming_the_key_path(value: Any) -> None:
    """The error says where the offending value sits and what its dtype is."""
    body = {"round": 1, "state": {"conv1.weight": value, "bn.num": np.int64(1)}}

    with pytest.raises(WireError, match=r"state\.conv1\.weight") as caught:
        wire.encode_cbor(body)

    assert str(np.asarray(value).dtype.name) in str(caught.value)


def test_key_path_names_list_positions_and_non_numpy_objects() -> None:
    """Paths cover lists too; a value of no wire type is refused the same way."""
    with pytest.raises(WireError, match=r"balls\[1\]\.centers"):
        wire.encode_cbor({"balls": [{}, {"centers": np.zeros(1, np.complex64)}]})
    with pytest.raises(WireError, match=r"report\.when: datetime"):
        wire.encode_cbor({"report": {"when": datetime.datetime.now()}})


# --- case 10: hostile CBOR on an update topic -----------------------------------------


def _envelope(
    xfer: str, index: int, count: int, size: int, chunk: bytes, digest: str = "0" * 64
) -> bytes:
    return cbor2.dumps(
        {
            "v": 1,
            "xfer": xfer,
            "part": index,
            "parts": count,
            "size": size,
            "sha256": digest,
            "data": chunk,
        }
    )


HUGE = 1 << 40
HOSTILE_BODIES: dict[str, bytes] = {
    # A header claiming 2**40 array items, with nothing after it...
    "array-claim": b"\x9b" + HUGE.to_bytes(8, "big"),
    # ...and one whose 2 million items are there: empty arrays, one byte each on
    # the wire and 64 once decoded.
    "array-items": b"\x9a" + (2_000_000).to_bytes(4, "big") + b"\x80" * 2_000_000,
    # A byte string claiming 2**40 bytes with 3 present.
    "bytes-claim": b"\x5b" + HUGE.to_bytes(8, "big") + b"abc",
    # 100,000 levels of nesting.
    "nesting": b"\x81" * 100_000 + b"\x00",
    # A tag grbfl never sends (cbor2 would build a shared reference from it).
    "tag": b"\xd8\x1c\x81\x00",
}


class _Watcher:
    """Keeps the last JSON body per topic under grbfl/<federation>/."""

    def __init__(self, broker: PrivateBroker, federation: str) -> None:
        self.last: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "test-watcher")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"grbfl/{federation}/run", qos=1)
        self.client.subscribe(f"grbfl/{federation}/nodes/+/status", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.last[msg.topic] = body

    def wait_for(
        self, topic: str, test: Callable[[dict[str, Any]], bool], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                body = self.last.get(topic)
            if body is not None and test(body):
                return
            time.sleep(0.1)
        raise AssertionError(f"{topic} never satisfied the test; last: {body}")

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _Publisher:
    """A plain MQTT client sending raw bytes, waiting for each to be accepted."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "test-mallory")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=60)
        assert info.is_published(), topic

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _PeakRss:
    """Samples a process's resident memory in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def _log_lines(path: Path, needle: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if needle in line]


def _wait_for_log(path: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _log_lines(path, needle):
        assert time.monotonic() < deadline, f"no {needle!r} in {path}"
        time.sleep(0.1)


@pytest.mark.broker
@pytest.mark.slow
def test_hostile_cbor_on_update_topics_is_dropped_and_the_federation_finishes(
    tmp_path: Path, broker: PrivateBroker, digits_dirs: tuple[Path, Path]
) -> None:
    """Lying headers, deep nesting, item bombs, a 300 MB transfer and an oversized
    message reach a running aggregator through the broker: each is dropped with a
    warning naming topic, sender and size, the aggregator's memory stays flat, and
    a real federation then finishes its rounds."""
    train_dir, test_dir = digits_dirs
    opts = SimOptions(
        participants=1,
        rounds=2,
        strategy="fedavg",
        data=train_dir,
        test_data=test_dir,
        limit=200,
        local_epochs=1,
        deadline_s=300.0,
        quiet=True,
    )
    workdir = tmp_path / "sim"
    workdir.mkdir()
    fed, agg_state = prepare(opts, workdir, broker.host, broker.port)
    # A daemon limit well above the CNN's 1.6 MB model, so the bombs fit under it.
    limit = 4 << 20
    agg_toml = fed.configs["aggregator"]
    settings = tomllib.loads(agg_toml.read_text())
    settings["broker"]["max_payload_bytes"] = limit
    agg_toml.write_text(dump_toml(settings))
    base = f"grbfl/{SIM_FEDERATION}"
    log_path = fed.log_path("aggregator")

    watcher = _Watcher(broker, SIM_FEDERATION)
    mallory = _Publisher(broker)
    sent: dict[str, tuple[str, int]] = {}  # sender: (what, bytes of one message)
    try:
        aggregator = fed.start("aggregator")
        watcher.wait_for(
            f"{base}/nodes/aggregator/status", lambda b: b["state"] == "idle", 120
        )
        process = psutil.Process(aggregator.pid)
        before = process.memory_info().rss
        rss = _PeakRss(aggregator.pid)

        # Each hostile body raw on the topic, and whole inside a valid transfer.
        for name, body in HOSTILE_BODIES.items():
            sender = f"raw-{name}"
            mallory.send(f"{base}/updates/{sender}", body)
            sent[sender] = (name, len(body))
            sender = f"body-{name}"
            (part,) = wire.split(body, 4 << 20)
            mallory.send(f"{base}/updates/{sender}", part)
            sent[sender] = (name, len(body))
        mallory.send(f"{base}/updates/bodies-done", b"\xff")
        _wait_for_log(log_path, "from sender bodies-done", 120)
        bomb_peak = rss.stop()

        # 300 MB, sent as the 1 MB parts a daemon would send it in.
        chunk = np.random.default_rng(0).bytes(1_000_000)
        parts = (_envelope("big", i, 300, 300_000_000, chunk) for i in range(300))
        for i, message in enumerate(parts):
            mallory.send(f"{base}/updates/big", message)
            if i == 0:
                sent["big"] = ("300 MB", len(message))  # the one warned about

        # One message larger than the daemon accepts at all.
        oversized = _envelope("over", 0, 1, 6_000_000, chunk * 6)
        mallory.send(f"{base}/updates/over", oversized)
        sent["over"] = ("oversized", len(oversized))

        # Messages from one client arrive in order: when this one is logged, all
        # of the above have been handled.
        mallory.send(f"{base}/updates/last", b"\xff")
        _wait_for_log(log_path, "from sender last", 120)
        kept = process.memory_info().rss - before
        assert aggregator.poll() is None, fed.log_tail("aggregator")

        # Now the real round, with junk arriving under the participant's own name
        # while it works.
        fed.start("p1")
        watcher.wait_for(f"{base}/run", lambda b: b.get("round") == 1, 120)
        for body in HOSTILE_BODIES.values():
            mallory.send(f"{base}/updates/p1", body)
        mallory.send(f"{base}/updates/p1", _envelope("p1-junk", 0, 2, 10, b"12345"))
        assert aggregator.wait(timeout=300) == 0, fed.log_tail("aggregator")
    finally:
        mallory.stop()
        watcher.stop()
        fed.stop_all()

    # Memory. Decoded, the item bomb alone would take over 128 MB at once.
    assert bomb_peak < 48 << 20, f"bombs: peak {bomb_peak / 1e6:.0f} MB more"
    # The 300 MB flood passes through the MQTT client faster than it is refused,
    # so it costs a transient backlog; what must not happen is keeping any of it.
    # The bound leaves room for what the allocator holds on to afterwards.
    assert kept < 100 << 20, f"after the flood: {kept / 1e6:.0f} MB more"

    # One warning per hostile message, naming topic, sender and size.
    for sender, (what, size) in sent.items():
        lines = _log_lines(log_path, f"from sender {sender}:")
        assert len(lines) == 1, (what, lines)
        assert "WARNING" in lines[0]
        assert f"dropped {size} bytes on {base}/updates/{sender} " in lines[0], what
    big = _log_lines(log_path, "from sender big:")[0]
    assert "announced size 300000000 bytes is above the limit" in big
    assert "exceeds limit" in _log_lines(log_path, "from sender over:")[0]
    assert len(_log_lines(log_path, "from sender p1:")) == len(HOSTILE_BODIES)

    # The federation went on: both rounds, with the participant.
    records = read_metrics(agg_state)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["participants"] == ["p1"] for r in records)


def test_structure_check_refuses_lies_before_cbor2_builds_anything() -> None:
    """The same bodies, decoded directly: refused quickly, with the reason."""
    reasons = {
        "array-claim": "array claims 1099511627776 items; 0 bytes follow",
        "array-items": "more than 100000 items",
        "bytes-claim": "byte string claims 1099511627776 bytes; 3 follow",
        "nesting": "nests deeper than 12 levels",
        "tag": "unexpected CBOR tag 28",
    }
    for name, body in HOSTILE_BODIES.items():
        started = time.perf_counter()
        with pytest.raises(WireError, match=reasons[name]):
            wire.decode_cbor(body, limit=1 << 30)
        assert time.perf_counter() - started < 1.0, name


def test_a_refused_transfer_costs_one_error_and_a_sender_holds_bounded_bytes() -> None:
    """Later parts of a transfer announced too large are dropped silently; a
    sender starting transfer after transfer cannot hold more than the limit."""
    assembler = wire.Reassembler(max_payload=10_000)
    with pytest.raises(WireError, match="announced size 300000000"):
        assembler.add(_envelope("big", 0, 300, 300_000_000, b"x" * 1000))
    assert assembler.add(_envelope("big", 1, 300, 300_000_000, b"x" * 1000)) is None

    for n in range(4):
        assembler.add(_envelope(f"t{n}", 0, 2, 8000, b"y" * 4000))
    held = sum(p.received for p in assembler._pending.values())
    assert held <= 10_000
    assert "t3" in assembler._pending


# --- case 11: messy image folders -----------------------------------------------------


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height grey pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _zero_png(width: int, height: int) -> bytes:
    """A real, complete grey PNG of zeros: tiny on disk, width*height decoded."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte and the pixels of one row
    idat = b"".join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()
    header = _png_declaring(width, height)
    ihdr_end = 8 + 12 + 13
    crc = zlib.crc32(b"IDAT" + idat) & 0xFFFFFFFF
    return (
        header[:ihdr_end]
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", crc)
        + header[-12:]
    )


# Files in red/ that must be skipped, and a word from the reason each one gets.
BAD_FILES = {
    "cut.jpg": "truncated",
    "empty.jpg": "cannot identify",
    "bomb.png": "decompression bomb",
    "bomb_quiet.png": "declares 9000x9000 pixels",
    ".DS_Store": "hidden file",
    "Thumbs.db": "system file",
    "._photo.jpg": "AppleDouble",
}


@pytest.fixture
def messy_root(tmp_path: Path) -> Path:
    """red: four good images in four modes and every kind of bad file; green: one
    image; blue: empty; beside them, folders that tools and systems leave."""
    root = tmp_path / "messy"
    red, green = root / "red", root / "green"
    for folder in (red, green, root / "blue"):
        folder.mkdir(parents=True)

    # Good images: RGB JPEG, RGBA PNG, grey+alpha PNG, palette PNG with a
    # transparent entry.
    Image.new("RGB", (48, 48), RED).save(red / "photo.jpg", quality=95)
    rgba = Image.new("RGBA", (32, 32), (*GREEN, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half fully transparent
    rgba.save(red / "rgba.png")
    grey = Image.new("LA", (32, 32), (120, 255))
    grey.paste((255, 0), (0, 0, 32, 16))  # top half fully transparent
    grey.save(red / "grey_alpha.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([*RED, 0, 0, 255])
    palette.paste(1, (16, 0, 32, 32))  # right half: entry 1, transparent
    palette.save(red / "palette.png", transparency=1)

    # Bad files.
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(red / "whole.jpg", quality=95)
    whole = (red / "whole.jpg").read_bytes()
    (red / "whole.jpg").unlink()
    (red / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (red / "empty.jpg").write_bytes(b"")
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (red / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100)
    (red / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\0" * 80)
    (red / "bomb.png").write_bytes(_png_declaring(20_000, 20_000))
    # Under PIL's own warning threshold, and still 81 M pixels to decode.
    (red / "bomb_quiet.png").write_bytes(_zero_png(9000, 9000))

    Image.new("RGB", (32, 32), GREEN).save(green / "leaf.png")

    # What notebooks, macOS and other tools leave beside the classes.
    (root / ".ipynb_checkpoints" / "red").mkdir(parents=True)
    shutil.copy(red / "photo.jpg", root / ".ipynb_checkpoints" / "red" / "p.jpg")
    (root / "__MACOSX" / "red").mkdir(parents=True)
    (root / "__MACOSX" / "red" / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "notes.txt").write_text("my photos")
    return root


def test_messy_folder_loads_every_good_image_as_rgb_with_a_fixed_background(
    messy_root: Path,
) -> None:
    """Four good images of red, one of green, none of blue; transparency becomes
    BACKGROUND and visible pixels keep their colour."""
    images = load_image_folder(messy_root, COLOURS)

    assert images.images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.images.dtype == np.uint8
    assert images.class_counts().tolist() == [4, 1, 0]
    good = [
        Path(rel).name
        for rel, _ in list_images(messy_root, COLOURS)
        if Path(rel).name not in BAD_FILES
    ]
    by_name = dict(zip(good, images.images, strict=True))
    assert np.abs(by_name["photo.jpg"].astype(int) - RED).max() <= 3
    assert (by_name["rgba.png"][:, :16] == BACKGROUND).all()
    assert (by_name["rgba.png"][:, 16:] == GREEN).all()
    assert (by_name["grey_alpha.png"][:16] == BACKGROUND).all()
    assert (by_name["grey_alpha.png"][16:] == 120).all()
    assert (by_name["palette.png"][:, :16] == RED).all()
    assert (by_name["palette.png"][:, 16:] == BACKGROUND).all()
    assert (by_name["leaf.png"] == GREEN).all()


def test_every_bad_file_is_skipped_with_one_warning_naming_it_and_why(
    messy_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="grbfl"):
        load_image_folder(messy_root, COLOURS)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, reason in BAD_FILES.items():
        naming = [w for w in warnings if f"red/{name}" in w]
        assert len(naming) == 1, (name, naming)
        detail = naming[0].split(f"red/{name}", 1)[1]
        assert reason in detail.split("red/")[0], (name, naming[0])
    # Nothing good is mentioned.
    for good in ("photo.jpg", "rgba.png", "grey_alpha.png", "palette.png"):
        assert not [w for w in warnings if f"red/{good}" in w], good


def test_decompression_bombs_are_skipped_without_being_decoded(
    messy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pixel data is never read for a file declaring too many pixels, whether or
    not PIL itself would have objected."""
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def watching_load(self: ImageFile.ImageFile) -> Any:
        loaded.append(Path(str(self.filename)).name)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", watching_load)
    started = time.perf_counter()
    load_image_folder(messy_root, COLOURS)

    assert "bomb.png" not in loaded and "bomb_quiet.png" not in loaded
    assert "photo.jpg" in loaded  # the watch works
    assert time.perf_counter() - started < 5.0


def test_junk_folders_and_files_never_become_classes_or_samples(
    messy_root: Path,
) -> None:
    """Folder discovery and listing ignore what systems and tools leave."""
    assert discover_classes(messy_root) == ("blue", "green", "red")
    listed = [rel for rel, _ in list_images(messy_root, COLOURS)]
    assert all(rel.split("/")[0] in COLOURS for rel in listed)
    assert not [rel for rel in listed if Path(rel).name in (".DS_Store", "Thumbs.db")]


@pytest.mark.broker
@pytest.mark.slow
def test_participant_with_a_messy_folder_takes_part_with_the_federations_classes(
    tmp_path: Path,
    broker: PrivateBroker,
    messy_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The empty class contributes nothing, the model keeps three outputs, and
    the round closes with the participant."""
    test_dir = solid_test_set(tmp_path / "test")
    aggregator = node_config(
        tmp_path, broker, "aggregator", "aggregator", test_dir, COLOURS
    )
    participant = node_config(
        tmp_path,
        broker,
        "participant",
        "p1",
        messy_root,
        COLOURS,
        training={"batch_size": 4},
    )

    with caplog.at_level(logging.INFO, logger="grbfl"):
        run_in_process([aggregator, participant])

    (record,) = metrics_of(aggregator)
    assert record["participants"] == ["p1"] and record["samples"] == 5
    messages = [r.getMessage() for r in caplog.records]
    assert "local data: 5 images; per class {'red': 4, 'green': 1, 'blue': 0}" in (
        messages
    )
    # The checkpoint holds a model of the federation's three classes: reading it
    # back checks every shape against a fresh three-class model.
    resumed = Aggregator(aggregator)
    assert resumed._load_checkpoint() == 1
    assert resumed.strategy.model.head.weight.shape == (3, CNN_WIDTHS[-1])


# --- case 12: small classes -----------------------------------------------------------


def test_ball_construction_adapts_to_small_one_sample_and_empty_classes(
    digits_dirs: tuple[Path, Path],
) -> None:
    """Forty, three, one and no samples of four classes, 200 balls asked for: each
    class gets the balls its samples can fill, none below min_size is shared."""
    images = load_image_folder(digits_dirs[0], DIGIT_CLASSES)
    flat = images.as_float().reshape(len(images), -1)
    pick = np.concatenate(
        [np.flatnonzero(images.labels == c)[:n] for c, n in ((0, 40), (1, 3), (2, 1))]
    )
    x, y = flat[pick], images.labels[pick]
    settings = BallSettings(n_clusters=200, variance_threshold=0.0, min_size=5)

    found, kept, report = build_balls(x, y, 4, settings)

    counts = [report.per_class_found[c] for c in range(4)]
    assert 1 <= counts[0] <= 40 // 5  # never more balls than min_size-sized ones
    assert counts[1:] == [1, 1, 0]
    assert found.sizes[found.labels == 1].tolist() == [3]
    assert found.sizes[found.labels == 2].tolist() == [1]
    assert int(found.sizes.sum()) == 44
    assert set(kept.labels.tolist()) == {0} and (kept.sizes >= 5).all()
    assert report.too_small >= 2


def test_nothing_to_share_still_makes_a_valid_update_and_round(
    tmp_path: Path, digits_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """With min_size 1 every ball of these 44 samples holds one sample, which is
    never shared: the update carries no balls, and the aggregator takes it, says
    why nothing changed, and leaves the model as it was."""
    images = load_image_folder(digits_dirs[0], DIGIT_CLASSES)
    pick = np.concatenate(
        [np.flatnonzero(images.labels == c)[:n] for c, n in ((0, 40), (1, 3), (2, 1))]
    )
    local = strategy.LocalData(images.as_float()[pick], images.labels[pick], 10)
    settings = {
        "n_clusters": 200,
        "variance_threshold": 0.0,
        "min_size": 1,
        "server_samples": 100,
        "server_epochs": 1,
        "batch_size": 16,
        "lr": 0.01,
    }
    order = strategy.Order(
        "run", 1, "balls", 0, "a1", 0.0, "balls", settings, None, "cnn", DIGIT_CLASSES
    )
    body = strategy.participant_work(
        order, None, local, "p1", tmp_path, threading.Event()
    )
    assert body["ball_report"]["found"] == 44 and body["ball_report"]["kept"] == 0

    server = ServerStrategy("balls", "cnn", 10, settings)
    before = server.global_state()
    received = wire.decode_cbor(wire.encode_cbor(body), limit=1 << 30)
    part = server.validate("balls", "p1", received, 0, 0)
    with caplog.at_level(logging.WARNING, logger="grbfl"):
        info = server.apply("balls", 1, [part])

    assert info["balls_sent"] == 0
    assert "no ball cleared" in caplog.text
    after = server.global_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["balls", "grbfl"])
def test_round_continues_when_a_participant_has_small_and_empty_classes(
    strategy_name: str,
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A participant holding 40, 3, 1 and 0 images of four classes (and none of
    the other six) answers every phase, and the round is aggregated."""
    train_dir, test_dir = digits_dirs
    local = copy_digits(train_dir, tmp_path / "local", {"0": 40, "1": 3, "2": 1})
    (local / "3").mkdir()
    aggregator = node_config(
        tmp_path,
        broker,
        "aggregator",
        "aggregator",
        test_dir,
        DIGIT_CLASSES,
        strategy={"name": strategy_name, "n_clusters": 30},
    )
    participant = node_config(
        tmp_path,
        broker,
        "participant",
        "p1",
        local,
        DIGIT_CLASSES,
        strategy={"name": strategy_name},
    )

    with caplog.at_level(logging.INFO, logger="grbfl"):
        run_in_process([aggregator, participant])

    (record,) = metrics_of(aggregator)
    assert record["participants"] == ["p1"]
    assert record["balls_sent"] >= 1 and record["samples"] == 44
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- case 13: BatchNorm statistics ----------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["fedavg", "grbfl"])
def test_batchnorm_statistics_are_the_sample_weighted_mean_and_counters_stay_int64(
    strategy_name: str, digits_dirs: tuple[Path, Path]
) -> None:
    """Two participants train real models on 30 and 90 images; their updates go
    through the wire and the aggregator: every running mean and variance is the
    30:90 mean of theirs, num_batches_tracked stays int64 (rounded, not cut)."""
    images = load_image_folder(digits_dirs[0], DIGIT_CLASSES)
    x, y = images.as_float(), images.labels
    server = ServerStrategy(strategy_name, "cnn", 10, {"min_size": 5}, seed=0)
    expected = server.expected_weights("train")
    assert expected is not None
    parts, states = [], []
    for owner, (start, n) in enumerate(((0, 30), (300, 90))):
        model = build_model("cnn", 10)
        load_numpy_state(model, server.global_state())
        settings = TrainSettings(batch_size=16, lr=0.05, warmup_steps=0, seed=owner)
        train(model, x[start : start + n], y[start : start + n], settings)
        weights = state_to_numpy(
            model, exclude=set(server.global_state()) - set(expected)
        )
        body = {"samples": n, "timings": {}, "weights": weights}
        received = wire.decode_cbor(wire.encode_cbor(body), limit=1 << 30)
        parts.append(server.validate("train", f"p{owner}", received, owner, 0))
        states.append(weights)

    server.apply("train", 1, parts)

    result = server.global_state()
    stats = [k for k in result if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 8  # four BatchNorm layers in the CNN
    for name in stats:
        assert not np.allclose(states[0][name], states[1][name]), name
        weighted = (
            30 * states[0][name].astype(np.float64) + 90 * states[1][name]
        ) / 120
        np.testing.assert_allclose(result[name], weighted, rtol=1e-6, atol=1e-7)
        assert result[name].dtype == np.float32
    tracked = [k for k in result if k.endswith("num_batches_tracked")]
    assert len(tracked) == 4
    for name in tracked:
        assert result[name].dtype == np.int64 and result[name].shape == ()
        steps = [int(s[name]) for s in states]
        assert steps == [2, 6]  # 30 and 90 images in batches of 16
        assert int(result[name]) == round((30 * steps[0] + 90 * steps[1]) / 120)
    # Through a checkpoint the counters stay integers too.
    back = _round_trip({"state": result})["state"]
    assert all(back[name].dtype == np.int64 for name in tracked)


# --- case 14: non-IID collapse --------------------------------------------------------


def _model_predicting(label: int) -> Any:
    """A real CNN whose head always answers label."""
    model = build_model("cnn", 10)
    state = state_to_numpy(model)
    state["head.weight"][:] = 0.0
    state["head.bias"][:] = 0.0
    state["head.bias"][label] = 10.0
    load_numpy_state(model, state)
    return model


def test_model_predicting_one_class_raises_a_collapse_alert(
    digits_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Evaluated on the real digits test set, a model that answers 3 every time
    is flagged, and its accuracy is what it should be (the share of threes)."""
    test = load_image_folder(digits_dirs[1], DIGIT_CLASSES)
    evaluation = assess(_model_predicting(3), test.as_float(), test.labels)

    with caplog.at_level(logging.WARNING, logger="grbfl"):
        fields = alerts.check_round(4, evaluation, None, DIGIT_CLASSES)

    assert evaluation.predicted[3] == len(test) and evaluation.predicted.sum() == len(
        test
    )
    assert evaluation.accuracy == pytest.approx(np.mean(test.labels == 3))
    assert fields["alerts"] == [alerts.COLLAPSE_ALERT]
    assert fields["prediction_share_max"] == 1.0
    assert fields["prediction_class_max"] == "3"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "round 4: class 3 takes 100% of the test predictions" in warning


def test_sharp_accuracy_fall_raises_an_alert_and_a_healthy_round_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Thresholds: ten points lost in a round; a class more than halfway from its
    label share to all predictions."""
    balanced = np.full(10, 100, np.int64)
    leaning = balanced.copy()
    leaning[0], leaning[1:] = 540, 460 // 9  # 54%: favoured, not collapsed
    healthy = Evaluation(0.80, 0.6, leaning, balanced)
    fallen = Evaluation(0.65, 1.1, balanced, balanced)

    with caplog.at_level(logging.WARNING, logger="grbfl"):
        calm = alerts.check_round(5, healthy, 0.75, DIGIT_CLASSES)
        assert calm["alerts"] == [] and not caplog.records
        small_dip = alerts.check_round(6, healthy, 0.89, DIGIT_CLASSES)
        assert small_dip["alerts"] == []
        drop = alerts.check_round(7, fallen, 0.80, DIGIT_CLASSES)

    assert drop["alerts"] == [alerts.ACCURACY_DROP_ALERT]
    assert "round 7: test accuracy fell from 0.8000 to 0.6500" in caplog.text
    two = Evaluation(0.5, 0.7, np.array([70, 30]), np.array([50, 50]))
    assert alerts.check_round(1, two, None, ("a", "b"))["alerts"] == []


def test_accuracy_of_the_round_before_survives_a_restart(tmp_path: Path) -> None:
    """A resumed aggregator compares with the round its metrics file recorded,
    past a last line a crash cut short."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        json.dumps({"round": 1, "accuracy": 0.5})
        + "\n"
        + json.dumps({"round": 2, "accuracy": 0.75})
        + '\n{"round": 3, "accur'
    )

    assert alerts.recorded_accuracy(metrics, 2) == 0.75
    assert alerts.recorded_accuracy(metrics, 3) is None
    assert alerts.recorded_accuracy(tmp_path / "missing.jsonl", 1) is None


@pytest.mark.broker
@pytest.mark.slow
def test_collapse_towards_one_class_reaches_the_metrics_record_and_the_log(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The most non-IID federation there is: its one participant holds zeros only.
    The averaged model learns to answer 0, and the aggregator says so."""
    train_dir, test_dir = digits_dirs
    local = copy_digits(train_dir, tmp_path / "zeros", {"0": 64})
    aggregator = node_config(
        tmp_path, broker, "aggregator", "aggregator", test_dir, DIGIT_CLASSES,
        training={"lr": 0.05, "local_epochs": 2, "batch_size": 8},
    )  # fmt: skip
    participant = node_config(
        tmp_path, broker, "participant", "p1", local, DIGIT_CLASSES
    )

    with caplog.at_level(logging.WARNING, logger="grbfl"):
        run_in_process([aggregator, participant])

    (record,) = metrics_of(aggregator)
    assert alerts.COLLAPSE_ALERT in record["alerts"]
    assert record["prediction_class_max"] == "0"
    assert record["prediction_share_max"] > 0.55
    assert "round 1: class 0 takes" in caplog.text


# --- case 15: blocking the loop -------------------------------------------------------


class _BlockingNode(Node):
    """A daemon whose main() blocks its own event loop, as a bug would."""

    role = "participant"

    def subscriptions(self) -> list[str]:
        return []

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        return None

    async def main(self) -> None:
        await self.link.connected.wait()
        await asyncio.sleep(0.5)  # let the monitor take its first breath
        time.sleep(LOOP_STALL_S + 0.5)
        await asyncio.sleep(0.5)  # let it notice


@pytest.mark.broker
def test_a_stalled_event_loop_is_logged(
    tmp_path: Path, broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Something holding the loop for 1.5 s is named in a warning with how long."""
    config = node_config(tmp_path, broker, "participant", "p1", tmp_path, ("a",))

    with caplog.at_level(logging.WARNING, logger="grbfl"):
        asyncio.run(asyncio.wait_for(_BlockingNode(config).serve(), 30))

    stalls = [r.getMessage() for r in caplog.records if "event loop stalled" in r.msg]
    assert len(stalls) == 1
    seconds = float(stalls[0].split("stalled for ")[1].split(" s")[0])
    assert LOOP_STALL_S < seconds < LOOP_STALL_S + 1.5


# Heavy functions as the daemons reach them: module, attribute, what it does.
HEAVY = [
    (strategy, "train", "training"),
    (strategy, "train_head", "training"),
    (strategy, "embed", "embedding"),
    (strategy, "assess", "evaluation"),
    (strategy, "find_ball_members", "clustering"),
    (strategy, "class_shapes", "clustering"),
    (strategy, "pool_shapes", "clustering"),
    (strategy, "merge_balls", "clustering"),
    (strategy, "sample_balls", "clustering"),
    (data, "decode_image", "image decoding"),
    (data.ImageSet, "as_float", "image conversion"),
    (wire, "encode_cbor", "encoding models and updates"),
]


@pytest.fixture
def heavy_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, bool]]]:
    """Record, for every heavy call, whether it ran on an event loop's thread."""
    calls: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def watch(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            with lock:
                calls.append((name, on_loop))
            return real(*args, **kwargs)

        return watched

    for owner, attribute, _ in HEAVY:
        monkeypatch.setattr(
            owner, attribute, watch(attribute, getattr(owner, attribute))
        )
    yield calls


@pytest.mark.broker
@pytest.mark.slow
def test_a_real_round_runs_heavy_work_in_worker_threads_and_never_stalls(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    heavy_calls: list[tuple[str, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A grbfl round (training, embedding, clustering, merging, sampling, head
    training, evaluation, image decoding): none of it on the loop, no stall."""
    train_dir, test_dir = digits_dirs
    local = copy_digits(train_dir, tmp_path / "local", {c: 12 for c in DIGIT_CLASSES})
    aggregator = node_config(
        tmp_path, broker, "aggregator", "aggregator", test_dir, DIGIT_CLASSES,
        strategy={"name": "grbfl", "min_size": 2},
    )  # fmt: skip
    participant = node_config(
        tmp_path, broker, "participant", "p1", local, DIGIT_CLASSES,
        strategy={"name": "grbfl", "min_size": 2},
    )  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="grbfl"):
        run_in_process([aggregator, participant])

    assert len(metrics_of(aggregator)) == 1
    called = {name for name, _ in heavy_calls}
    assert called == {attribute for _, attribute, _ in HEAVY}
    on_loop = sorted({name for name, loop in heavy_calls if loop})
    assert not on_loop, f"ran on the event loop: {on_loop}"
    assert "event loop stalled" not in caplog.text
