"""grbfl watch: one readable line per message, from real encoded payloads."""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt import publish

from grbfl import wire
from grbfl.broker import PrivateBroker
from grbfl.errors import BrokerError, GrbflError
from grbfl.watch import (
    check_federation,
    format_line,
    parse_broker,
    printable,
    relative_topic,
    summarise,
    watch,
)
from grbfl.wire import Reassembler

NOW = 1_700_000_000.0


def model_body() -> bytes:
    state = {
        "conv1.weight": np.zeros((8, 3, 3, 3), np.float32),
        "conv1.bias": np.zeros(8, np.float32),
        "fc.weight": np.ones((10, 32), np.float32),
        "fc.bias": np.zeros(10, np.float32),
        "bn.num_batches_tracked": np.zeros((), np.int64),
    }
    return wire.encode_cbor(
        {
            "run": "0123456789abcdef0123",
            "round": 4,
            "phase": "train",
            "model": "cnn",
            "state": state,
        }
    )


def model_parts(count: int = 3) -> list[bytes]:
    body = model_body()
    parts = wire.split(body, len(body) // count + 1, xfer=wire.digest_of(body))
    assert len(parts) == count
    return parts


def update_parts() -> list[bytes]:
    balls = {
        "labels": np.array([0, 0, 1, 2, 2, 2], np.int64),
        "sizes": np.full(6, 12, np.int64),
        "centers": np.zeros((6, 64), np.float32),
        "variances": np.full((6, 64), 0.05, np.float32),
        "radii": np.ones(6, np.float32),
    }
    body = {
        "run": "r1",
        "round": 2,
        "phase": "embed",
        "node": "p1",
        "samples": 480,
        "timings": {"embed_s": 0.5, "cluster_s": 1.25},
        "balls": balls,
        "ball_report": {"kept": 6},
    }
    return wire.split(wire.encode_cbor(body), 1 << 20)


# --- pure summaries --------------------------------------------------------------


def test_model_in_three_chunks_out_of_order_is_summarised_when_whole() -> None:
    """Each chunk shows its place; the last one to arrive shows the decoded model."""
    parts = model_parts()
    reassemblers: dict[str, Reassembler] = {}

    lines = [summarise(f"model/{i}", parts[i], reassemblers) for i in (2, 0, 1)]

    digest = wire.digest_of(model_body())
    assert lines[0].startswith(f"part 3/3 of {digest[:8]} (")
    assert f"sha256 {digest[:8]}" in lines[0]
    assert "complete" not in lines[0] and "complete" not in lines[1]
    assert lines[1].startswith("part 1/3")
    assert lines[2].startswith("part 2/3")
    summary = lines[2].split("=> complete: ", 1)[1]
    assert summary.startswith("run 01234567 round 4 phase train model cnn;")
    assert "5 arrays, 555 elements" in summary
    assert "state/conv1.weight float32[8, 3, 3, 3]" in summary
    assert summary.endswith(", ...")


def test_update_with_balls_shows_scalars_timings_and_ball_count() -> None:
    (part,) = update_parts()

    line = summarise("updates/p1", part, {})

    assert line.startswith("part 1/1 of ")
    summary = line.split("=> complete: ", 1)[1]
    assert "run r1 round 2 phase embed node p1 samples 480" in summary
    assert "timings embed_s=0.50,cluster_s=1.25" in summary
    assert "balls 6 (dim 64)" in summary
    assert "5 arrays, 786 elements: balls/labels int64[6]" in summary


def test_updates_of_two_nodes_reassemble_separately() -> None:
    """Interleaved chunks from different participants do not mix."""
    reassemblers: dict[str, Reassembler] = {}
    a = wire.split(wire.encode_cbor({"node": "a", "x": np.arange(100)}), 300)
    b = wire.split(wire.encode_cbor({"node": "b", "x": np.arange(100)}), 300)
    assert len(a) == len(b) > 1

    lines = []
    for pa, pb in zip(a, b, strict=True):
        lines.append(summarise("updates/a", pa, reassemblers))
        lines.append(summarise("updates/b", pb, reassemblers))

    assert "complete: node a;" in lines[-2]
    assert "complete: node b;" in lines[-1]
    assert sum("complete" in line for line in lines) == 2


def test_corrupt_chunk_is_reported_and_the_transfer_not_decoded() -> None:
    """A flipped byte in a part's data fails the digest: undecodable, no crash."""
    parts = model_parts()
    bad = bytearray(parts[1])
    bad[-5] ^= 0xFF
    reassemblers: dict[str, Reassembler] = {}

    lines = [
        summarise("model/0", parts[0], reassemblers),
        summarise("model/1", bytes(bad), reassemblers),
        summarise("model/2", parts[2], reassemblers),
    ]

    assert "undecodable: " in lines[2] and "digest or size mismatch" in lines[2]
    assert not any("complete" in line for line in lines)


def test_envelope_that_is_not_cbor_is_undecodable() -> None:
    assert summarise("updates/p9", b"\xff\x00junk", {}).startswith(
        "undecodable: malformed CBOR"
    )
    assert summarise("model/0", wire.encode_cbor({"v": 2}), {}) == (
        "undecodable: not a grbfl envelope (version 1)"
    )


def test_whole_transfer_that_is_not_a_map_is_undecodable() -> None:
    (part,) = wire.split(wire.encode_cbor([1, 2, 3]), 1024)

    line = summarise("updates/p1", part, {})

    assert line.endswith("undecodable: body is a list, not a map")


def test_empty_retained_payload_reads_cleared() -> None:
    assert summarise("model/3", b"", {}) == "cleared"
    assert summarise("nodes/p1/status", b"", {}) == "cleared"


def test_status_shows_node_role_state_run_and_round() -> None:
    payload = wire.encode_json(
        {
            "node": "p1",
            "role": "participant",
            "state": "training",
            "run": "a1b2c3d4e5f6a7b8c9d0",
            "round": 3,
            "version": "0.1.0",
        }
    )

    assert summarise("nodes/p1/status", payload, {}) == (
        "p1 participant training run a1b2c3d4 round 3"
    )


def test_health_shows_temperature_throttling_load_and_memory() -> None:
    payload = wire.encode_json(
        {
            "cpu_temp_c": 71.26,
            "throttle": {
                "raw": "0x50002",
                "now": {"under_voltage": False, "freq_capped": True},
                "since_boot": {"under_voltage": True},
            },
            "load_avg": [3.5, 2.25, 1.0],
            "memory": {"percent": 41.6, "used_bytes": 1, "available_bytes": 2},
        }
    )

    assert summarise("nodes/pi3/health", payload, {}) == (
        "temp 71.3 C throttle freq_capped load 3.50/2.25/1.00 mem 42%"
    )


def test_health_off_a_pi_reads_not_available() -> None:
    payload = wire.encode_json({"cpu_temp_c": None, "throttle": None, "load_avg": []})

    assert summarise("nodes/x/health", payload, {}) == "temp n/a throttle n/a"


def test_run_shows_round_phase_attempt_deadline_strategy_and_digest() -> None:
    payload = wire.encode_json(
        {
            "run": "r1",
            "round": 3,
            "rounds": 10,
            "phase": "embed",
            "attempt": 1,
            "deadline": NOW + 90.4,
            "strategy": "grbfl",
            "model_digest": "ab" * 32,
        }
    )

    assert summarise("run", payload, {}, now=NOW) == (
        "run r1 round 3/10 phase embed attempt 1 deadline in 90 s strategy grbfl "
        "model abababab"
    )


def test_metrics_show_accuracy_bytes_and_seconds() -> None:
    payload = wire.encode_json(
        {
            "round": 3,
            "accuracy": 0.91234,
            "bytes_up": 2_345_678,
            "bytes_down": 512,
            "seconds": {"round": 12.34, "aggregation": 1.0},
        }
    )

    assert summarise("metrics", payload, {}) == (
        "round 3 accuracy 0.9123 up 2.3 MB down 512 B 12.3 s"
    )


def test_malformed_or_odd_json_never_raises() -> None:
    """Bad JSON is undecodable; wrong field types still give a line."""
    assert summarise("metrics", b"{oops", {}).startswith("undecodable: not valid JSON")
    assert summarise("run", b"[1,2]", {}) == "undecodable: JSON body is not an object"
    odd = wire.encode_json(
        {"round": "x", "accuracy": None, "bytes_up": [], "seconds": "slow"}
    )
    assert summarise("metrics", odd, {}) == "round 'x' accuracy ? up [] down ? 'slow' s"
    weird_health = wire.encode_json({"throttle": {"now": "yes"}, "memory": []})
    assert summarise("nodes/a/health", weird_health, {}) == "temp n/a throttle n/a"


def test_unknown_topics_show_compact_json() -> None:
    assert summarise("extra/thing", wire.encode_json({"b": 1, "a": "x"}), {}) == (
        '{"a":"x","b":1}'
    )


def test_line_has_time_topic_and_retained_flag() -> None:
    line = format_line(NOW, "run", "summary", retained=True)

    assert line.endswith(" run (retained)  summary")
    assert line[:8] == time.strftime("%H:%M:%S", time.localtime(NOW))


def test_topics_are_shown_relative_to_the_federation() -> None:
    assert relative_topic("grbfl/lab/nodes/p1/status", "lab") == "nodes/p1/status"
    assert relative_topic("grbfl/other/run", "lab") == "grbfl/other/run"


def test_broker_address_must_be_host_and_port() -> None:
    assert parse_broker("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker("[::1]:8883") == ("::1", 8883)
    for bad in ("localhost", "host:port", ":1883", "h:70000"):
        with pytest.raises(GrbflError, match="expected HOST:PORT"):
            parse_broker(bad)


def test_refused_subscription_is_recognised_in_both_protocol_versions() -> None:
    """A SUBACK failure (0x80) means an ACL hides the federation: say so."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from grbfl.watch import _refused

    assert not _refused([ReasonCode(PacketTypes.SUBACK, identifier=1)])
    assert _refused([ReasonCode(PacketTypes.SUBACK, identifier=0x87)])
    assert _refused((0x80,))
    assert not _refused((1,))


CLEAR_SCREEN = "\u001b[2J"


def test_escape_codes_in_a_status_cannot_reach_the_terminal() -> None:
    """A hostile node name, state or topic level is shown escaped, on one line."""
    payload = wire.encode_json(
        {
            "node": f"p1{CLEAR_SCREEN}",
            "role": "participant\nforged line",
            "state": "\u001b[31mred\u009b",
            "round": 1,
        }
    )
    topic = f"nodes/p1{CLEAR_SCREEN}/status"

    line = format_line(NOW, topic, summarise(topic, payload, {}))

    assert line.isprintable()
    assert "\x1b" not in line and "\n" not in line and "\x9b" not in line
    assert "nodes/p1\\x1b[2J/status  p1\\x1b[2J participant\\nforged" in line
    assert "\\x1b[31mred\\x9b round 1" in line


def test_every_kind_of_summary_escapes_control_characters() -> None:
    """Strings reach the line from run, metrics, health, unknown JSON and CBOR."""
    bad = f"x{CLEAR_SCREEN}\ud800\u202e"  # a lone surrogate: only JSON can carry it
    odd = f"x{CLEAR_SCREEN}\u202e"
    update = wire.split(
        wire.encode_cbor({"node": odd, "round": 1, odd: 2, "w": {odd: np.zeros(2)}}),
        1 << 20,
    )[0]
    messages = [
        ("run", wire.encode_json({"phase": bad, "strategy": bad, "run": bad})),
        ("metrics", wire.encode_json({"round": bad, "accuracy": bad})),
        ("nodes/a/health", wire.encode_json({"throttle": {"now": {bad: True}}})),
        ("extra", wire.encode_json({bad: bad})),
        ("updates/a", update),
    ]

    for topic, payload in messages:
        summary = summarise(topic, payload, {})
        assert summary.isprintable(), (topic, summary)
        assert "\x1b" not in summary, topic


def test_printable_leaves_ordinary_text_alone() -> None:
    """Accents, arrows and spaces are not control characters."""
    assert printable("Zürich → p1 ok") == "Zürich → p1 ok"
    assert printable("a\tb\x00") == "a\\tb\\x00"


@pytest.mark.parametrize("bad", ["#", "+", "lab/x", "", "a+b", "l#", "x\u001b[2J"])
def test_federation_that_is_not_one_topic_level_is_refused(bad: str) -> None:
    """A wildcard or separator would watch other federations or nothing at all."""
    with pytest.raises(GrbflError, match="--federation"):
        check_federation(bad)


def test_watch_refuses_a_wildcard_federation_before_connecting() -> None:
    """No broker is contacted: the port below has nobody listening."""
    from grbfl.broker import free_port

    err = io.StringIO()
    with pytest.raises(GrbflError, match="--federation '#'") as caught:
        asyncio.run(watch(_args(free_port(), 1, federation="#"), err=err))

    assert not isinstance(caught.value, BrokerError)
    assert "\n" not in str(caught.value)
    assert err.getvalue() == ""


# --- against a real broker -------------------------------------------------------


def _args(port: int, count: int, federation: str = "t") -> argparse.Namespace:
    return argparse.Namespace(
        broker=f"127.0.0.1:{port}",
        federation=federation,
        username=None,
        password=None,
        tls_ca=None,
        count=count,
    )


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_watch_command_prints_three_messages_and_exits(broker: PrivateBroker) -> None:
    """`grbfl watch --count 3` shows a retained run, then two live messages."""
    host, port = broker.host, broker.port
    run = wire.encode_json(
        {
            "run": "r9",
            "round": 1,
            "phase": "train",
            "attempt": 0,
            "deadline": time.time() + 60,
            "strategy": "fedavg",
            "model_digest": None,
        }
    )
    publish.single("grbfl/t/run", run, hostname=host, port=port, retain=True, qos=1)
    (update,) = update_parts()
    status = wire.encode_json({"node": "p1", "role": "participant", "state": "idle"})

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grbfl",
            "watch",
            "--broker",
            f"{host}:{port}",
            "--federation",
            "t",
            "--count",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The retained run arrives only once the watcher has subscribed.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        publish.multiple(
            [
                {"topic": "grbfl/t/nodes/p1/status", "qos": 1, "payload": status},
                {"topic": "grbfl/t/updates/p1", "qos": 1, "payload": update},
                {"topic": "grbfl/elsewhere/run", "qos": 1, "payload": b"{}"},
            ],
            hostname=host,
            port=port,
        )
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = [first.rstrip("\n"), *rest.splitlines()]
    assert proc.returncode == 0, err
    assert len(lines) == 3, lines
    assert " run (retained)  run r9 round 1 phase train" in lines[0]
    assert lines[1].endswith(" nodes/p1/status  p1 participant idle")
    assert " updates/p1  part 1/1 of " in lines[2]
    assert "complete: run r1 round 2 phase embed node p1" in lines[2]
    assert f"connected to {host}:{port}, watching grbfl/t/#" in err


async def _until(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_watch_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    """Losing the broker prints a line; the watcher comes back and keeps counting."""
    out, err = io.StringIO(), io.StringIO()
    first = PrivateBroker(tmp_path / "b1").start()
    port = first.port
    status = wire.encode_json({"node": "p1", "role": "participant", "state": "idle"})

    async def scenario() -> None:
        task = asyncio.create_task(watch(_args(port, 2), out=out, err=err))
        await _until(lambda: "connected" in err.getvalue(), "the first connection")
        await asyncio.to_thread(
            publish.single,
            "grbfl/t/nodes/p1/status",
            status,
            hostname="127.0.0.1",
            port=port,
            qos=1,
        )
        await _until(lambda: out.getvalue().count("\n") == 1, "the first message")

        first.stop()
        await _until(lambda: "lost broker" in err.getvalue(), "the loss line")
        second = PrivateBroker(tmp_path / "b2", port=port).start()
        try:
            await _until(lambda: "reconnected" in err.getvalue(), "the reconnection")
            await asyncio.to_thread(
                publish.single,
                "grbfl/t/metrics",
                wire.encode_json({"round": 1}),
                hostname="127.0.0.1",
                port=port,
                qos=1,
            )
            await asyncio.wait_for(task, timeout=20)
        finally:
            task.cancel()
            second.stop()

    try:
        asyncio.run(scenario())
    finally:
        first.stop()

    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].endswith(" metrics  round 1 accuracy ? up ? down ? ? s")


def test_unreachable_broker_at_start_is_an_error(tmp_path: Path) -> None:
    """A broker that never answered is a mistake to report, not to wait out."""
    from grbfl.broker import free_port

    with pytest.raises(BrokerError, match="cannot watch 127.0.0.1:"):
        asyncio.run(watch(_args(free_port(), 1), out=io.StringIO(), err=io.StringIO()))
