"""`grbfl watch`: a decoded, live view of one federation.

What ``mosquitto_sub -v -t 'grbfl/<federation>/#'`` shows, one line per message,
with JSON bodies cut down to the fields an operator looks at and CBOR chunk
envelopes shown part by part, then summarised once a transfer is whole.

The formatting lives in pure functions (``summarise``, ``format_line``) so tests
can feed them real payloads; ``watch`` only connects, reconnects and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import aiomqtt
import numpy as np

from .errors import BrokerError, GrbflError, WireError
from .link import backoff_delays
from .topics import Topics
from .wire import Reassembler, decode_cbor, decode_json, iter_arrays, parse_part

log = logging.getLogger(__name__)

# The watcher has no config file; this is the daemon's default
# broker.max_payload_bytes, so it accepts whatever a default federation sends.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
# Array names listed in a transfer summary; a ResNet has over a hundred tensors and
# the line must stay readable.
SHOWN_ARRAYS = 3
# Unknown JSON bodies and error reasons are cut to this many characters.
SHOWN_CHARS = 120
# Strings longer than this (run ids, update ids, digests) are shortened.
LONG_STRING = 16
SHORT_ID = 8
# Scalar fields of a transfer body shown first, in this order; others follow.
_LEADING_FIELDS = ("run", "round", "phase", "node", "strategy", "model", "samples")
# One reassembler per sender; a hostile stream of node names must not grow the
# watcher without bound, so the oldest sender is forgotten past this many.
MAX_SENDERS = 256
# A broker that refuses the first connection is most likely a typo; after that,
# losses are outages worth waiting out. Keepalive as the daemon's default.
KEEPALIVE_S = 30
# A topic may be 65,535 bytes; a federation name is one level of it and this leaves
# ample room for the levels below while catching a pasted blob.
MAX_FEDERATION_BYTES = 256
CONNECT_TIMEOUT_S = 10.0


# --- formatting helpers ----------------------------------------------------------


def printable(text: str) -> str:
    """text with every unprintable character shown as a Python escape (\\x1b).

    Node names, states, topic levels and JSON strings come from whoever can publish
    to the broker; an escape sequence among them could clear or recolour the
    operator's terminal, a newline could forge a line, a lone surrogate could stop
    the watcher when printed.
    """
    if text.isprintable():
        return text
    # repr escapes exactly the characters isprintable rejects.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, width: int = SHORT_ID) -> str:
    """A string cut to ``width`` characters when it is long (ids, digests)."""
    text = str(value)
    return text[:width] if len(text) > LONG_STRING else text


def _num(value: Any, spec: str = "g") -> str:
    """Format a number with ``spec``; anything else as its repr, so odd bodies show."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?" if value is None else repr(value)[:SHOWN_CHARS]
    return format(value, spec)


def _bytes(value: Any) -> str:
    """A byte count in B, kB, MB or GB (decimal, like the daemon's logs)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _num(value)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return _short(value)
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _compact_json(body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


# --- JSON bodies -----------------------------------------------------------------


def summarise_status(body: Mapping[str, Any]) -> str:
    """node role state, run and round of a status body."""
    parts = [
        str(body.get("node", "?")),
        str(body.get("role", "?")),
        str(body.get("state", "?")),
    ]
    if body.get("run") is not None:
        parts.append(f"run {_short(body['run'])}")
    if body.get("round") is not None:
        parts.append(f"round {_num(body['round'])}")
    return " ".join(parts)


def _throttling(throttle: Any) -> str:
    """The throttle flags set right now, 'none', or 'n/a' off a Pi."""
    if not isinstance(throttle, Mapping):
        return "n/a"
    now = throttle.get("now")
    if not isinstance(now, Mapping):
        return "n/a"
    active = [str(name) for name, on in now.items() if on]
    return ",".join(active) if active else "none"


def summarise_health(body: Mapping[str, Any]) -> str:
    """Temperature, throttling, load and memory of a health body."""
    temp = body.get("cpu_temp_c")
    parts = [f"temp {_num(temp, '.1f')} C" if temp is not None else "temp n/a"]
    parts.append(f"throttle {_throttling(body.get('throttle'))}")
    load = body.get("load_avg")
    if isinstance(load, list) and load:
        parts.append("load " + "/".join(_num(x, ".2f") for x in load))
    memory = body.get("memory")
    if isinstance(memory, Mapping) and "percent" in memory:
        parts.append(f"mem {_num(memory['percent'], '.0f')}%")
    return " ".join(parts)


def summarise_run(body: Mapping[str, Any], now: float) -> str:
    """Round, phase, attempt, time to the deadline, strategy and model digest."""
    round_ = _num(body.get("round"))
    if body.get("rounds") is not None:
        round_ += f"/{_num(body['rounds'])}"
    parts = [f"run {_short(body.get('run'))} round {round_}"]
    parts.append(f"phase {body.get('phase', '?')}")
    parts.append(f"attempt {_num(body.get('attempt'))}")
    deadline = body.get("deadline")
    if isinstance(deadline, int | float) and not isinstance(deadline, bool):
        left = deadline - now
        parts.append(
            f"deadline in {left:.0f} s" if left >= 0 else f"deadline {-left:.0f} s ago"
        )
    parts.append(f"strategy {body.get('strategy', '?')}")
    digest = body.get("model_digest")
    parts.append(f"model {_short(digest) if digest else '-'}")
    return " ".join(parts)


def summarise_metrics(body: Mapping[str, Any]) -> str:
    """Round, accuracy, bytes up and down and seconds of a metrics body."""
    seconds = body.get("seconds")
    if isinstance(seconds, Mapping):
        seconds = seconds.get("round")
    return (
        f"round {_num(body.get('round'))} accuracy {_num(body.get('accuracy'), '.4f')}"
        f" up {_bytes(body.get('bytes_up'))} down {_bytes(body.get('bytes_down'))}"
        f" {_num(seconds, '.1f')} s"
    )


# --- CBOR transfers --------------------------------------------------------------


def _arrays_summary(body: Any) -> str:
    arrays = list(iter_arrays(body))
    if not arrays:
        return "no arrays"
    total = sum(int(array.size) for _, array in arrays)
    shown = ", ".join(
        f"{name.lstrip('/')} {array.dtype}{list(array.shape)}"
        for name, array in arrays[:SHOWN_ARRAYS]
    )
    more = ", ..." if len(arrays) > SHOWN_ARRAYS else ""
    noun = "array" if len(arrays) == 1 else "arrays"
    return f"{len(arrays)} {noun}, {total:,} elements: {shown}{more}"


def _balls_summary(balls: Mapping[str, Any]) -> str:
    """Ball count (and dimensions) of a wire ball map."""
    arrays = [v for v in balls.values() if isinstance(v, np.ndarray) and v.ndim]
    if not arrays:
        return "balls ?"
    labels = balls.get("labels")
    first = labels if isinstance(labels, np.ndarray) and labels.ndim else arrays[0]
    text = f"balls {first.shape[0]}"
    centers = balls.get("centers")
    if isinstance(centers, np.ndarray) and centers.ndim == 2:
        text += f" (dim {centers.shape[1]})"
    return text


def summarise_body(body: Any) -> str:
    """Scalar fields, timings, ball count and arrays of a decoded transfer body."""
    if not isinstance(body, Mapping):
        raise WireError(f"body is a {type(body).__name__}, not a map")
    fields = [f"{k} {_scalar(body[k])}" for k in _LEADING_FIELDS if k in body]
    fields += [
        f"{k} {_scalar(v)}"
        for k, v in body.items()
        if k not in _LEADING_FIELDS and isinstance(k, str) and _is_scalar(v)
    ]
    timings = body.get("timings")
    if isinstance(timings, Mapping) and timings:
        fields.append(
            "timings " + ",".join(f"{k}={_num(v, '.2f')}" for k, v in timings.items())
        )
    balls = body.get("balls")
    if isinstance(balls, Mapping):
        fields.append(_balls_summary(balls))
    return " ".join(fields) + "; " + _arrays_summary(body)


def _sender(topic_rel: str) -> str:
    """Which reassembler a chunk belongs to: all model parts share one."""
    return "model" if topic_rel.startswith("model/") else topic_rel


def summarise_part(
    topic_rel: str,
    payload: bytes,
    reassemblers: dict[str, Reassembler],
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> str:
    """One chunk envelope; with the decoded body when it completes its transfer."""
    part = parse_part(payload, max_payload=max_payload)
    text = (
        f"part {part.index + 1}/{part.count} of {_short(part.xfer)} "
        f"({_bytes(part.size)}, sha256 {part.digest[:SHORT_ID]})"
    )

    # Feed the sender's reassembler; forget the oldest sender past the cap.
    key = _sender(topic_rel)
    reassembler = reassemblers.pop(key, None) or Reassembler(max_payload)
    reassemblers[key] = reassembler
    while len(reassemblers) > MAX_SENDERS:
        del reassemblers[next(iter(reassemblers))]
    try:
        done = reassembler.add(payload)
        if done is None:
            return text
        body = decode_cbor(done[1], limit=max_payload)
        return f"{text} => complete: {summarise_body(body)}"
    except WireError as exc:
        return f"{text} undecodable: {_reason(exc)}"


# --- one message -----------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _json_kind(topic_rel: str) -> Callable[[Mapping[str, Any], float], str] | None:
    levels = topic_rel.split("/")
    if len(levels) == 3 and levels[0] == "nodes" and levels[2] == "status":
        return lambda body, now: summarise_status(body)
    if len(levels) == 3 and levels[0] == "nodes" and levels[2] == "health":
        return lambda body, now: summarise_health(body)
    if topic_rel == "run":
        return summarise_run
    if topic_rel == "metrics":
        return lambda body, now: summarise_metrics(body)
    return None


def summarise(
    topic_rel: str,
    payload: bytes,
    reassemblers: dict[str, Reassembler],
    *,
    now: float | None = None,
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> str:
    """A one-line summary of one message on ``grbfl/<federation>/<topic_rel>``.

    ``reassemblers`` carries partial transfers from one call to the next; pass the
    same dict for every message of a stream. Never raises: a body that cannot be
    read is reported as ``undecodable: <reason>``. Unprintable characters from the
    body come out escaped (see ``printable``).
    """
    if not payload:
        return "cleared"
    now = time.time() if now is None else now
    try:
        if topic_rel.startswith(("model/", "updates/")):
            text = summarise_part(topic_rel, payload, reassemblers, max_payload)
        else:
            kind = _json_kind(topic_rel)
            body = decode_json(payload)
            text = kind(body, now) if kind else _compact_json(body)
    except WireError as exc:
        text = f"undecodable: {_reason(exc)}"
    except Exception as exc:
        # A watcher must outlive any body, including ones that trip this code.
        log.debug("summarising %s failed", topic_rel, exc_info=True)
        text = f"undecodable: {type(exc).__name__}: {_reason(exc)}"
    return printable(text)


def format_line(
    when: float, topic_rel: str, summary: str, *, retained: bool = False
) -> str:
    """Local time, topic under the federation, and the summary, safe to print."""
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    flag = " (retained)" if retained else ""
    return f"{stamp} {printable(topic_rel)}{flag}  {printable(summary)}"


def relative_topic(topic: str, federation: str) -> str:
    """The topic below ``grbfl/<federation>/``; the full topic if outside it."""
    prefix = Topics(federation).base + "/"
    return topic[len(prefix) :] if topic.startswith(prefix) else topic


# --- the connection --------------------------------------------------------------


def check_federation(name: str) -> None:
    """GrbflError unless name is one topic level a subscription can use verbatim."""
    if (
        not name
        or any(c in name for c in "/+#")
        or not name.isprintable()
        or len(name.encode()) > MAX_FEDERATION_BYTES
    ):
        raise GrbflError(
            f"--federation {name[:MAX_FEDERATION_BYTES]!r}: a federation name is one "
            "MQTT topic level: not empty, no '/', '+', '#' or control characters, "
            f"at most {MAX_FEDERATION_BYTES} bytes"
        )


def parse_broker(text: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets); GrbflError when malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 < port < 65536:
        raise GrbflError(f"--broker {text!r}: expected HOST:PORT")
    return host, port


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    ca = getattr(args, "tls_ca", None)
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise GrbflError(f"--tls-ca {ca}: cannot load CA certificate: {exc}") from exc


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _refused(granted: Any) -> bool:
    """Whether a SUBACK refused any filter (0x80 in MQTT 3.1.1, >= 0x80 in 5)."""
    codes = granted if isinstance(granted, list | tuple) else [granted]
    return any(
        bool(getattr(code, "is_failure", False))
        or (isinstance(code, int) and code >= 0x80)
        for code in codes
    )


async def watch(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> None:
    """Print every message of a federation until ``args.count`` (0: forever)."""
    out = out or sys.stdout
    err = err or sys.stderr
    federation: str = args.federation
    check_federation(federation)
    host, port = parse_broker(args.broker)
    count: int = getattr(args, "count", 0) or 0
    tls_context = _tls_context(args)
    topics = Topics(federation)
    reassemblers: dict[str, Reassembler] = {}
    delays = backoff_delays()
    connected_once = False
    seen = 0

    while True:
        client = aiomqtt.Client(
            host,
            port,
            username=getattr(args, "username", None),
            password=getattr(args, "password", None),
            identifier=f"grbfl-watch-{uuid.uuid4().hex[:8]}",
            clean_session=True,
            keepalive=KEEPALIVE_S,
            tls_context=tls_context,
            timeout=CONNECT_TIMEOUT_S,
        )
        try:
            async with client:
                granted = await client.subscribe(topics.all, qos=1)
                if _refused(granted):
                    raise BrokerError(
                        f"broker {host}:{port} refused the subscription to "
                        f"{topics.all}; check the user's ACL"
                    )
                print(
                    f"{_stamp()} {'reconnected' if connected_once else 'connected'} "
                    f"to {host}:{port}, watching {topics.all}",
                    file=err,
                    flush=True,
                )
                connected_once = True
                delays = backoff_delays()
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        payload = b"" if payload is None else str(payload).encode()
                    topic_rel = relative_topic(message.topic.value, federation)
                    summary = summarise(topic_rel, bytes(payload), reassemblers)
                    line = format_line(
                        time.time(), topic_rel, summary, retained=bool(message.retain)
                    )
                    print(line, file=out, flush=True)
                    seen += 1
                    if count and seen >= count:
                        return
        except aiomqtt.MqttError as exc:
            if not connected_once:
                raise BrokerError(f"cannot watch {host}:{port}: {exc}") from exc
            delay = next(delays)
            print(
                f"{_stamp()} lost broker {host}:{port} ({printable(str(exc))}); "
                f"reconnecting in {delay:.1f} s",
                file=err,
                flush=True,
            )
            await asyncio.sleep(delay)
