"""Network and process faults (issue 5, cases 1 to 8), against a real Mosquitto.

Every federation here is real `grbfl run` processes on the bundled digits, kept
small (fedavg, a few hundred images, one or two local epochs) so that each test
takes seconds. Faults are made the way they happen: brokers with small size
limits, a broker stopped and started again without persistence, signals, bytes
published again on the broker, checkpoint files cut short. The one hook the
product has for tests is GRBFL_TEST_KILL_AT (aggregator.TEST_KILL_AT_ENV), which
makes the aggregator SIGKILL itself at a chosen point of a chosen round.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from grbfl import wire
from grbfl.aggregate import weighted_average
from grbfl.aggregator import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    TEST_KILL_AT_ENV,
    read_checkpoint,
)
from grbfl.broker import PrivateBroker
from grbfl.config import BrokerConfig, dump_toml
from grbfl.data import load_image_folder
from grbfl.errors import BrokerLimitError
from grbfl.link import ENVELOPE_BYTES, Link
from grbfl.models import build_model
from grbfl.simulate import FEDERATION, Federation, SimOptions, prepare, read_metrics
from grbfl.topics import Topics
from grbfl.training import TrainSettings, train
from notify_socket import NotifySocket

pytestmark = pytest.mark.broker

TOPICS = Topics(FEDERATION)
# A size limit far below one model (1.6 MB), so everything bulk must be chunked.
SMALL_LIMIT = 20_000
# Bytes of a PUBLISH packet besides its topic and payload, for payloads this small:
# fixed header (4), topic length (2), packet id (2), property length (1).
PUBLISH_OVERHEAD = 9


# --- helpers -----------------------------------------------------------------------


@dataclass
class Transfer:
    """One chunked payload as seen on the broker."""

    topic: str
    parts: dict[int, bytes] = field(default_factory=dict)
    count: int = 0
    completed_at: float = 0.0

    def data(self) -> bytes:
        envelopes = [cbor2.loads(self.parts[i]) for i in range(self.count)]
        return b"".join(e["data"] for e in envelopes)

    def body(self) -> Any:
        return wire.decode_cbor(self.data(), limit=1 << 30)


class Watcher:
    """Records every grbfl message with its arrival time, like mosquitto_sub -v,
    and subscribes again whenever it reconnects (the broker may restart)."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, f"test-watcher-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "watcher could not subscribe"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe("grbfl/#", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(
                (time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain))
            )

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def snapshot(self) -> list[tuple[float, str, bytes, bool]]:
        with self.lock:
            return list(self.messages)

    def json_on(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (t, json.loads(p)) for t, top, p, _ in self.snapshot() if top == topic and p
        ]

    def transfers(self, prefix: str) -> list[Transfer]:
        """Complete chunked transfers on topics starting with prefix, in the
        order they completed (a transfer sent again completes again)."""
        pending: dict[str, Transfer] = {}
        done: list[Transfer] = []
        for t, topic, payload, _ in self.snapshot():
            if not topic.startswith(prefix) or not payload:
                continue
            envelope = cbor2.loads(payload)
            xfer = pending.setdefault(envelope["xfer"], Transfer(topic))
            xfer.count = envelope["parts"]
            xfer.parts[envelope["part"]] = payload
            if len(xfer.parts) == xfer.count:
                xfer.completed_at = t
                done.append(pending.pop(envelope["xfer"]))
        return done


def wait_for(
    condition: Callable[[], Any],
    what: str,
    fed: Federation | None = None,
    timeout: float = 60.0,
) -> Any:
    """Poll until condition() is truthy; fail with every daemon's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = ""
            if fed is not None:
                tails = "".join(
                    f"\n--- {node}:\n{fed.log_tail(node, 30)}" for node in fed.configs
                )
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tails}")
        time.sleep(0.05)


def log_of(fed: Federation, node: str) -> str:
    return fed.log_path(node).read_text(errors="replace")


def connections(broker: PrivateBroker, node: str) -> int:
    """How often the daemon of node connected, from Mosquitto's log."""
    text = broker.log_path.read_text(errors="replace")
    return text.count(f" as grbfl-{FEDERATION}-{node} (")


def make_federation(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    *,
    participants: int = 2,
    rounds: int = 1,
    min_participants: int | None = None,
    deadline_s: float = 60.0,
    local_epochs: int = 1,
    limits: dict[str, int] | None = None,
    settings: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> tuple[Federation, Path]:
    """Configs for a small fedavg federation on the digits; nothing started yet.

    limits caps each participant's images (data.limit); settings adds config keys
    per node, as {node: {section: {key: value}}}.
    """
    train_dir, test_dir = digits_dirs
    opts = SimOptions(
        data=train_dir,
        test_data=test_dir,
        participants=participants,
        rounds=rounds,
        strategy="fedavg",
        broker=f"{broker.host}:{broker.port}",
        workdir=tmp_path / "sim",
        quiet=True,
        deadline_s=deadline_s,
        local_epochs=local_epochs,
        lr=0.02,
        augment=False,
    )
    workdir = tmp_path / "sim"
    workdir.mkdir()
    fed, agg_state = prepare(opts, workdir, broker.host, broker.port)
    changes: dict[str, dict[str, dict[str, Any]]] = {
        "aggregator": {
            "rounds": {"min_participants": min_participants or participants},
            # The first local steps of a round at full rate; no warm-up needed here.
            "training": {"warmup_steps": 0},
        }
    }
    for node, limit in (limits or {}).items():
        changes.setdefault(node, {}).setdefault("data", {})["limit"] = limit
    for node, sections in (settings or {}).items():
        for section, values in sections.items():
            changes.setdefault(node, {}).setdefault(section, {}).update(values)
    for node, sections in changes.items():
        path = fed.configs[node]
        raw = tomllib.loads(path.read_text())
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        path.write_text(dump_toml(raw))
    return fed, agg_state


def start_all(fed: Federation) -> None:
    for node in fed.configs:
        fed.start(node)


def started_federation(
    cleanup: list[Any], *args: Any, **kwargs: Any
) -> tuple[Federation, Path]:
    """make_federation's federation, every process started, stopped after the
    test whatever happens."""
    fed, agg_state = make_federation(*args, **kwargs)
    cleanup.append(fed)
    start_all(fed)
    return fed, agg_state


def finish(fed: Federation, timeout: float = 120.0) -> None:
    """Wait for the aggregator to exit after the last round; it must succeed."""
    code = wait_for(
        lambda: fed.processes["aggregator"].poll() is not None,
        "the aggregator to finish the run",
        fed,
        timeout,
    )
    assert code and fed.processes["aggregator"].returncode == 0, fed.log_tail(
        "aggregator", 40
    )


def metrics_lines(agg_state: Path) -> list[dict[str, Any]]:
    path = agg_state / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things to stop after a test, whatever happened: federations, watchers."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Federation):
            thing.stop_all()
        else:
            thing.stop()


def small_broker(tmp_path: Path, **settings: str | int) -> Iterator[PrivateBroker]:
    with PrivateBroker(tmp_path / "broker", settings=settings) as running:
        yield running


@pytest.fixture
def packet_limited_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """Mosquitto that disconnects clients sending packets over SMALL_LIMIT bytes
    (and says so in its CONNACK, to MQTT 5 clients)."""
    yield from small_broker(tmp_path, max_packet_size=SMALL_LIMIT)


@pytest.fixture
def message_limited_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """Mosquitto that drops publishes over SMALL_LIMIT bytes of payload, and tells
    no client about its limit (the deprecated message_size_limit)."""
    yield from small_broker(tmp_path, message_size_limit=SMALL_LIMIT)


def run_links(broker: PrivateBroker, scenario: Callable[..., Any]) -> Any:
    """Run scenario(talker, listener, received) with two connected Links."""
    received: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes, retained: bool) -> None:
        received.append((topic, payload))

    async def main() -> Any:
        cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=5)
        talker = Link(cfg, "t-talker", [], handler)
        listener = Link(cfg, "t-listener", ["t/#"], handler)
        tasks = [asyncio.create_task(talker.run()), asyncio.create_task(listener.run())]
        try:
            await talker.wait_connected(10)
            await listener.wait_connected(10)
            return await scenario(talker, listener, received)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


# --- 1. oversized payloads ---------------------------------------------------------


def test_bulk_payload_is_cut_to_the_packet_limit_the_broker_announces(
    packet_limited_broker: PrivateBroker,
) -> None:
    """A 200 kB payload through a broker taking 20 kB packets arrives whole, in
    chunks cut to the limit from the broker's CONNACK, with no disconnect."""
    broker = packet_limited_broker
    body = np.random.default_rng(0).bytes(200_000)

    async def scenario(
        talker: Link, listener: Link, received: list[Any]
    ) -> tuple[int, list[tuple[str, bytes]]]:
        assert talker.max_packet == SMALL_LIMIT
        count = await talker.publish_bulk(lambda _: "t/bulk", body, xfer="x" * 32)
        for _ in range(100):
            if len(received) == count:
                break
            await asyncio.sleep(0.05)
        return count, list(received)

    count, received = run_links(broker, scenario)

    assert count >= 10
    assert len(received) == count
    assert all(len(p) + len(t) + PUBLISH_OVERHEAD <= SMALL_LIMIT for t, p in received)
    reassembler = wire.Reassembler(1 << 20, max_pending=1)
    results = [reassembler.add(p) for _, p in received]
    assert results[-1] is not None and results[-1][1] == body
    # The envelope around a chunk stays within what the Link leaves room for.
    envelope = wire.split(b"x" * 5000, 1000, xfer="f" * 64)[0]
    assert len(envelope) - 1000 <= ENVELOPE_BYTES
    log = broker.log_path.read_text()
    assert "oversize" not in log
    assert log.count(" as t-talker (") == 1


def test_message_over_message_size_limit_fails_once_naming_its_size(
    message_limited_broker: PrivateBroker,
) -> None:
    """A broker that silently refuses large publishes: the publish fails with an
    error naming the message's size, is not resent after the reconnect, and the
    link goes on carrying messages that fit."""
    broker = message_limited_broker

    async def scenario(
        talker: Link, listener: Link, received: list[Any]
    ) -> tuple[BrokerLimitError, float]:
        started = time.monotonic()
        with pytest.raises(BrokerLimitError) as caught:
            await asyncio.wait_for(talker.publish("t/big", b"b" * 30_000), 20)
        seconds = time.monotonic() - started
        await talker.publish("t/small", b"fits")
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert [t for t, _ in received] == ["t/small"]
        await asyncio.sleep(2.0)  # time for a resend loop to show itself
        return caught.value, seconds

    error, seconds = run_links(broker, scenario)

    assert "30,000-byte message on t/big" in str(error)
    assert error.size == 30_000
    assert seconds < 10
    log = broker.log_path.read_text()
    assert log.count(" as t-talker (") == 2  # the broker's disconnect, then back


@pytest.mark.slow
def test_model_and_update_arrive_whole_through_a_small_max_packet_size(
    tmp_path: Path,
    packet_limited_broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """With broker.chunk_bytes at its 256 KiB default and a broker taking 20 kB
    packets, the 1.6 MB model and update go through in chunks that fit: the
    round completes and no daemon is ever disconnected."""
    broker = packet_limited_broker
    watcher = Watcher(broker)
    cleanup.append(watcher)
    fed, agg_state = started_federation(
        cleanup, tmp_path, broker, digits_dirs, participants=1, limits={"p1": 100}
    )
    finish(fed)

    assert [(r["round"], r["participants"]) for r in read_metrics(agg_state)] == [
        (1, ["p1"])
    ]
    for prefix in (f"{TOPICS.base}/model/", TOPICS.updates("p1")):
        transfers = watcher.transfers(prefix)
        assert transfers, prefix
        assert transfers[0].count > 50, prefix
        assert all(
            len(part) + len(transfers[0].topic) + PUBLISH_OVERHEAD <= SMALL_LIMIT
            for part in transfers[0].parts.values()
        )
    assert "oversize" not in broker.log_path.read_text()
    assert connections(broker, "aggregator") == connections(broker, "p1") == 1


@pytest.mark.slow
def test_update_over_message_size_limit_fails_naming_sizes_and_the_node_stays_up(
    tmp_path: Path,
    message_limited_broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """p1's chunks fit under the broker's 20 kB message_size_limit, p2's (the
    256 KiB default) do not: p2 says which sizes do not fit, once, without
    resending; it stays up, and the round closes with p1 at its deadline."""
    broker = message_limited_broker
    fits = {"broker": {"chunk_bytes": 16_384}}
    fed, agg_state = started_federation(
        cleanup,
        tmp_path,
        broker,
        digits_dirs,
        min_participants=1,
        deadline_s=8.0,
        limits={"p1": 64, "p2": 64},
        settings={"aggregator": fits, "p1": fits},
    )

    wait_for(lambda: "cannot send the update" in log_of(fed, "p2"), "p2's error", fed)
    finish(fed)

    # p2 stayed up until the run was over, then left like every participant.
    assert fed.processes["p2"].wait(timeout=30) == 0
    p2_log = log_of(fed, "p2")
    assert "is done; exiting" in p2_log
    assert p2_log.count("cannot send the update") == 1
    assert "broker.chunk_bytes in" in p2_log and "is 262144" in p2_log
    assert "message size limit" in p2_log and "-byte message on" in p2_log
    # One connection for the work, one after the broker closed it over the chunk.
    assert connections(broker, "p2") == 2
    assert [(r["round"], r["participants"]) for r in read_metrics(agg_state)] == [
        (1, ["p1"])
    ]


@pytest.mark.slow
def test_model_over_message_size_limit_stops_the_aggregator_with_a_config_error(
    tmp_path: Path,
    message_limited_broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """An aggregator whose model chunks the broker refuses exits at once with the
    configuration-error status (systemd does not restart it) and a message that
    names the model's size, the chunk size and the setting to change."""
    broker = message_limited_broker
    fed, _ = started_federation(
        cleanup, tmp_path, broker, digits_dirs, participants=1, limits={"p1": 64}
    )

    code = wait_for(
        lambda: fed.processes["aggregator"].poll() is not None,
        "the aggregator to give up",
        fed,
    )
    assert code is not None and fed.processes["aggregator"].returncode == 78
    text = log_of(fed, "aggregator")
    assert "configuration error" in text and "broker.chunk_bytes = 262144" in text
    assert "cannot publish the model of 1,5" in text
    assert "message size limit" in text
    assert connections(broker, "aggregator") <= 2


# --- 2. broker restarts ------------------------------------------------------------


def restart(broker: PrivateBroker) -> None:
    """Stop Mosquitto and start it again on the same port; it keeps nothing."""
    broker.stop()
    broker.start()


@pytest.mark.slow
def test_every_round_finishes_through_broker_restarts_between_and_during_rounds(
    tmp_path: Path, digits_dirs: tuple[Path, Path], cleanup: list[Any]
) -> None:
    """Mosquitto without persistence restarts right after round 1 and again while
    round 3 trains: daemons reconnect with backoff, the aggregator puts back the
    run and model the broker lost and asks again, and every round finishes with
    both participants, at the first attempt, without waiting out a deadline."""
    broker = PrivateBroker(tmp_path / "broker").start()
    cleanup.append(broker)
    watcher = Watcher(broker)
    cleanup.append(watcher)
    fed, agg_state = started_federation(
        cleanup,
        tmp_path,
        broker,
        digits_dirs,
        rounds=3,
        deadline_s=120.0,
        local_epochs=2,
        limits={"p1": 200, "p2": 200},
    )

    # Between rounds: as soon as round 1 is on disk.
    wait_for(lambda: read_metrics(agg_state), "round 1 to finish", fed)
    restart(broker)
    # In the middle of a round: while the participants train for round 3.
    wait_for(
        lambda: "round 3 train: working" in log_of(fed, "p1"),
        "round 3 to start",
        fed,
    )
    restarted = time.monotonic()
    restart(broker)
    finish(fed)

    records = read_metrics(agg_state)
    assert [(r["round"], r["participants"], r["attempts"]) for r in records] == [
        (1, ["p1", "p2"], 1),
        (2, ["p1", "p2"], 1),
        (3, ["p1", "p2"], 1),
    ]
    assert all(r["seconds"]["round"] < 60 for r in records), records
    assert len(metrics_lines(agg_state)) == 3
    for node in ("aggregator", "p1", "p2"):
        text = log_of(fed, node)
        assert text.count("reconnected to broker") >= 2, node
        assert "unreachable" in text and "retrying in" in text, node
        assert connections(broker, node) >= 3, node
    # The restarted broker held nothing; the aggregator put back round 3's run
    # message and the model whose digest it names.
    assert "published round 3 train again" in log_of(fed, "aggregator")
    runs = [
        body
        for t, body in watcher.json_on(TOPICS.run)
        if t > restarted and (body["round"], body["phase"]) == (3, "train")
    ]
    assert runs, "no round-3 run message after the restart"
    models = {
        wire.digest_of(x.data())
        for x in watcher.transfers(f"{TOPICS.base}/model/")
        if x.completed_at > restarted
    }
    assert runs[0]["model_digest"] in models


# --- 3. long local work ------------------------------------------------------------


def seconds_per_epoch(train_dir: Path, images: int) -> float:
    """How long one local epoch on `images` digits takes on one thread, now."""
    import torch

    data = load_image_folder(train_dir, tuple(str(d) for d in range(10)))
    x, y = data.as_float()[:images], data.labels[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        train(
            build_model("cnn", 10),
            x,
            y,
            TrainSettings(epochs=1, batch_size=64, lr=0.02, augment=False, seed=0),
        )
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_longer_than_several_keepalives_keeps_link_and_watchdog_alive(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A participant with a 5 s keepalive trains for three or four keepalives and
    sends nothing else meanwhile (health once an hour): the broker never times it
    out, it never reconnects, and its systemd watchdog pings keep coming."""
    keepalive = 5
    images = 300
    epochs = math.ceil(3.5 * keepalive / seconds_per_epoch(digits_dirs[0], images))
    notify = NotifySocket(tmp_path / "notify")
    cleanup.append(notify)
    fed, agg_state = make_federation(
        tmp_path,
        broker,
        digits_dirs,
        participants=1,
        local_epochs=epochs,
        limits={"p1": images},
        settings={
            "p1": {
                "broker": {"keepalive": keepalive},
                "training": {"threads": 1},
                "health": {"interval_s": 3600.0},
            }
        },
    )
    cleanup.append(fed)
    fed.start("aggregator")
    with monkeypatch.context() as env:
        env.setenv("NOTIFY_SOCKET", str(notify.path))
        env.setenv("WATCHDOG_USEC", "2000000")  # pings every second
        fed.start("p1")
    finish(fed, timeout=180)

    (record,) = read_metrics(agg_state)
    trained = record["seconds"]["local_training"]
    assert record["participants"] == ["p1"]
    assert trained > 2 * keepalive, f"training took only {trained:.1f} s"
    assert "exceeded timeout" not in broker.log_path.read_text()
    assert connections(broker, "p1") == 1
    assert "unreachable" not in log_of(fed, "p1")
    pings = notify.times_of("WATCHDOG")
    gaps = np.diff(pings)
    assert len(pings) >= trained, f"{len(pings)} pings in {trained:.0f} s of training"
    assert gaps.max() < 2.0, f"the watchdog went {gaps.max():.1f} s without a ping"


# --- 4. clean stop during a round --------------------------------------------------


def statuses(watcher: Watcher, node: str) -> list[tuple[float, dict[str, Any]]]:
    return watcher.json_on(TOPICS.status(node))


@pytest.mark.slow
def test_sigterm_mid_round_publishes_offline_and_the_round_closes_at_once(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """SIGTERM (what `systemctl stop` sends) to a participant still training: it
    publishes its own offline status and disconnects cleanly (no last will), and
    the aggregator closes the round with p1 at once, not at its 120 s deadline."""
    watcher = Watcher(broker)
    cleanup.append(watcher)
    fed, agg_state = started_federation(
        cleanup,
        tmp_path,
        broker,
        digits_dirs,
        min_participants=1,
        deadline_s=120.0,
        local_epochs=12,
        limits={"p1": 64, "p2": 700},
    )
    wait_for(
        lambda: (
            "update from p1" in log_of(fed, "aggregator")
            and "round 1 train: working" in log_of(fed, "p2")
        ),
        "p1's update while p2 trains",
        fed,
    )
    assert "round 1 train: sent" not in log_of(fed, "p2")

    stopped = time.monotonic()
    fed.processes["p2"].send_signal(signal.SIGTERM)
    assert fed.processes["p2"].wait(timeout=30) == 0, fed.log_tail("p2")
    finish(fed)

    (record,) = read_metrics(agg_state)
    assert record["participants"] == ["p1"]
    (closed_at, _), *_ = watcher.json_on(TOPICS.metrics)
    assert closed_at - stopped < 10, f"round closed {closed_at - stopped:.1f} s after"
    assert "deadline passed" not in log_of(fed, "aggregator")
    # Its own goodbye (the last will would say run None, round 0), then a clean
    # DISCONNECT, after which Mosquitto sends no will.
    _, last = statuses(watcher, "p2")[-1]
    assert last["state"] == "offline"
    assert (last["run"], last["round"]) == (record["run"], 1)
    assert last["pid"] == fed.processes["p2"].pid
    text = broker.log_path.read_text()
    assert f"Client grbfl-{FEDERATION}-p2 disconnected." in text
    assert f"Client grbfl-{FEDERATION}-p2 closed its connection" not in text


# --- 5 and 7. duplicate and straggling updates --------------------------------------


@dataclass
class ReplayedRun:
    records: list[dict[str, Any]]
    updates: dict[int, list[dict[str, Any]]]
    round_2_model: dict[str, np.ndarray]
    final_model: dict[str, np.ndarray]
    aggregator_log: str


@pytest.fixture(scope="module")
def replayed(
    tmp_path_factory: pytest.TempPathFactory, digits_dirs: tuple[Path, Path]
) -> Iterator[ReplayedRun]:
    """A 2-round run in which the test publishes p1's round-1 update again, byte
    for byte: twice while round 1 is still open (as a QoS 1 redelivery would), and
    once as soon as round 2 is announced (as a straggler would)."""
    tmp = tmp_path_factory.mktemp("replay")
    with PrivateBroker(tmp / "broker") as broker:
        watcher = Watcher(broker)
        fed, agg_state = make_federation(
            tmp,
            broker,
            digits_dirs,
            rounds=2,
            deadline_s=120.0,
            local_epochs=4,
            limits={"p1": 64, "p2": 700},
        )
        try:
            start_all(fed)
            first = wait_for(
                lambda: watcher.transfers(TOPICS.updates("p1")),
                "p1's round-1 update",
                fed,
            )[0]
            for _ in range(2):
                for i in range(first.count):
                    watcher.publish(first.topic, first.parts[i])
            wait_for(
                lambda: any(b["round"] == 2 for _, b in watcher.json_on(TOPICS.run)),
                "round 2 to be announced",
                fed,
            )
            for i in range(first.count):
                watcher.publish(first.topic, first.parts[i])
            finish(fed)
        finally:
            fed.stop_all()
            watcher.stop()

        # What the participants really sent, once each.
        updates: dict[int, list[dict[str, Any]]] = {}
        seen: set[str] = set()
        for node in ("p1", "p2"):
            for xfer in watcher.transfers(TOPICS.updates(node)):
                body = xfer.body()
                if body["update_id"] not in seen:
                    seen.add(body["update_id"])
                    updates.setdefault(body["round"], []).append(body)
        models = [x.body() for x in watcher.transfers(f"{TOPICS.base}/model/")]
        yield ReplayedRun(
            records=read_metrics(agg_state),
            updates=updates,
            round_2_model=next(m["state"] for m in models if m["round"] == 2),
            final_model=read_checkpoint(agg_state / CHECKPOINT)["state"],
            aggregator_log=log_of(fed, "aggregator"),
        )


def average(updates: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return weighted_average(
        [u["weights"] for u in updates], [u["samples"] for u in updates]
    )


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a
    )


@pytest.mark.slow
def test_an_update_delivered_three_times_counts_once_and_leaves_the_aggregate(
    replayed: ReplayedRun,
) -> None:
    """p1's round-1 update arrives three times: the round counts it once (two
    duplicates noted in its metrics) and the global model is exactly the
    sample-weighted average of p1's and p2's updates."""
    first = replayed.records[0]
    sent = replayed.updates[1]
    assert sorted(u["node"] for u in sent) == ["p1", "p2"]
    assert first["participants"] == ["p1", "p2"]
    assert first["duplicate_updates"] == 2
    assert first["samples"] == sum(u["samples"] for u in sent) == 64 + 700
    assert same_state(replayed.round_2_model, average(sent))
    p1 = next(u for u in sent if u["node"] == "p1")
    assert not same_state(replayed.round_2_model, average([*sent, p1, p1]))


@pytest.mark.slow
def test_an_update_for_the_previous_round_is_rejected_as_stale(
    replayed: ReplayedRun,
) -> None:
    """p1's round-1 update arriving while round 2 is open is ignored as stale (and
    counted so in round 2's metrics); round 2's model is the average of the
    round-2 updates alone."""
    second = replayed.records[1]
    sent = replayed.updates[2]
    assert sorted(u["node"] for u in sent) == ["p1", "p2"]
    assert second["participants"] == ["p1", "p2"]
    assert second["stale_updates"] == 1
    assert second["samples"] == 64 + 700
    assert same_state(replayed.final_model, average(sent))
    straggler = next(u for u in replayed.updates[1] if u["node"] == "p1")
    assert not same_state(replayed.final_model, average([*sent, straggler]))
    assert (
        "round 2 train: ignoring a stale update from p1 for round 1 train "
        "(an earlier round)" in replayed.aggregator_log
    )


# --- 6. a participant killed mid-round ---------------------------------------------


@pytest.mark.slow
def test_a_participant_killed_mid_round_is_waited_for_neither_now_nor_later(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """SIGKILL p3 while it trains for round 1, with min_participants = 2: the
    broker's last will marks it offline, round 1 closes with p1 and p2 within its
    deadline, and round 2 runs with them without waiting for p3."""
    watcher = Watcher(broker)
    cleanup.append(watcher)
    fed, agg_state = started_federation(
        cleanup,
        tmp_path,
        broker,
        digits_dirs,
        participants=3,
        rounds=2,
        min_participants=2,
        deadline_s=60.0,
        local_epochs=8,
        limits={"p1": 64, "p2": 64, "p3": 700},
    )
    wait_for(lambda: "round 1 train: working" in log_of(fed, "p3"), "p3 to train", fed)
    killed = time.monotonic()
    fed.processes["p3"].send_signal(signal.SIGKILL)
    finish(fed)

    records = read_metrics(agg_state)
    assert [(r["round"], r["participants"]) for r in records] == [
        (1, ["p1", "p2"]),
        (2, ["p1", "p2"]),
    ]
    (closed_at, _), *_ = watcher.json_on(TOPICS.metrics)
    assert closed_at - killed < 60
    assert records[1]["seconds"]["round"] < 30
    assert "deadline passed" not in log_of(fed, "aggregator")
    _, will = statuses(watcher, "p3")[-1]
    assert (will["state"], will["run"]) == ("offline", None)


@pytest.mark.slow
def test_a_round_left_short_by_a_kill_is_retried_and_the_node_rejoins(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
) -> None:
    """SIGKILL p2 while it trains, with min_participants = 2: round 1 cannot close
    at its deadline and is announced again; p2, started again, answers the retry,
    and both rounds finish with both participants."""
    fed, agg_state = started_federation(
        cleanup,
        tmp_path,
        broker,
        digits_dirs,
        rounds=2,
        deadline_s=8.0,
        local_epochs=3,
        limits={"p1": 64, "p2": 300},
    )
    wait_for(lambda: "round 1 train: working" in log_of(fed, "p2"), "p2 to train", fed)
    fed.processes["p2"].send_signal(signal.SIGKILL)
    wait_for(
        lambda: "needed participants answered; retrying" in log_of(fed, "aggregator"),
        "round 1 to be retried",
        fed,
    )
    fed.start("p2")
    finish(fed)

    first, second = read_metrics(agg_state)
    assert first["participants"] == second["participants"] == ["p1", "p2"]
    assert first["attempts"] >= 2
    assert "round 1 train: only 1 of 2 needed" in log_of(fed, "aggregator")


# --- 8. aggregator killed -----------------------------------------------------------


def start_aggregator_to_die(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    with monkeypatch.context() as env:
        env.setenv(TEST_KILL_AT_ENV, at)
        fed.start("aggregator")
    code = wait_for(
        lambda: fed.processes["aggregator"].poll() is not None,
        f"the aggregator to die at {at}",
        fed,
    )
    assert code is not None and fed.processes["aggregator"].returncode == -9


@pytest.mark.slow
def test_aggregator_killed_while_writing_its_checkpoint_resumes_from_the_last_one(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed halfway through writing round 2's checkpoint, the aggregator leaves
    round 1's checkpoint and a half-written file; started again, it removes the
    half-written file, resumes the same run after round 1 and finishes, each
    round's metrics written once."""
    fed, agg_state = make_federation(
        tmp_path, broker, digits_dirs, rounds=2, limits={"p1": 64, "p2": 64}
    )
    cleanup.append(fed)
    fed.start("p1")
    fed.start("p2")
    start_aggregator_to_die(fed, monkeypatch, "checkpoint:2")
    (partial,) = agg_state.glob(f".{CHECKPOINT}.*.tmp")
    assert read_checkpoint(agg_state / PREVIOUS_CHECKPOINT)["round"] == 1
    assert [r["round"] for r in metrics_lines(agg_state)] == [1]
    run = metrics_lines(agg_state)[0]["run"]

    fed.start("aggregator")
    finish(fed)

    text = log_of(fed, "aggregator")
    assert f"removing {partial}" in text
    assert f"resuming run {run} after round 1" in text
    assert not partial.exists()
    assert [(r["round"], r["run"]) for r in metrics_lines(agg_state)] == [
        (1, run),
        (2, run),
    ]
    assert read_checkpoint(agg_state / CHECKPOINT)["round"] == 2


@pytest.mark.slow
def test_aggregator_killed_after_aggregating_skips_a_truncated_checkpoint(
    tmp_path: Path,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
    cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed right after aggregating round 3, the aggregator has written nothing
    of it; round 2's checkpoint is then cut to half its bytes. Started again, it
    detects the damage, sets that file aside unused, resumes the same run from
    round 1's checkpoint and finishes all three rounds."""
    fed, agg_state = make_federation(
        tmp_path, broker, digits_dirs, rounds=3, limits={"p1": 64, "p2": 64}
    )
    cleanup.append(fed)
    fed.start("p1")
    fed.start("p2")
    start_aggregator_to_die(fed, monkeypatch, "aggregated:3")
    assert [r["round"] for r in metrics_lines(agg_state)] == [1, 2]
    run = metrics_lines(agg_state)[0]["run"]
    latest = agg_state / CHECKPOINT
    assert read_checkpoint(latest)["round"] == 2
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])

    fed.start("aggregator")
    finish(fed)

    text = log_of(fed, "aggregator")
    assert f"checkpoint {latest} is damaged" in text
    assert f"resuming run {run} after round 1 from" in text
    assert (agg_state / f"{CHECKPOINT}.damaged").read_bytes() == data[: len(data) // 2]
    records = read_metrics(agg_state)
    assert [(r["round"], r["run"]) for r in records] == [(1, run), (2, run), (3, run)]
    assert read_checkpoint(latest)["round"] == 3


def test_checkpoint_of_another_strategy_is_a_config_error_and_stays_put(
    tmp_path: Path,
) -> None:
    """A state folder holding a fedavg run, under a config that says grbfl, is a
    configuration error (exit 78, not retried: a restart would meet the same
    file) naming the config file, the checkpoint and the setting; the checkpoint
    is left where it was for the operator to move."""
    from grbfl.aggregator import Aggregator
    from grbfl.config import config_from_dict
    from grbfl.errors import ConfigError

    def aggregator(strategy: str) -> Aggregator:
        raw = {
            "node": {"role": "aggregator", "id": "agg"},
            "data": {"dir": str(tmp_path), "classes": ["a", "b"]},
            "strategy": {"name": strategy},
            "state": {"dir": str(tmp_path / "state")},
        }
        return Aggregator(config_from_dict(raw, source="agg.toml"))

    old = aggregator("fedavg")
    old.run_id = "old-run"
    old._save_checkpoint(2, {"round": 2})
    checkpoint = tmp_path / "state" / CHECKPOINT
    saved = checkpoint.read_bytes()

    with pytest.raises(ConfigError) as caught:
        aggregator("grbfl")._load_checkpoint()

    assert str(caught.value) == (
        f"agg.toml: checkpoint {checkpoint} belongs to strategy 'fedavg' but "
        "strategy.name = 'grbfl'; move it away to start a new run"
    )
    assert checkpoint.read_bytes() == saved
