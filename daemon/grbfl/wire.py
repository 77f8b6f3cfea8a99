"""What travels on the broker: JSON for people, CBOR for bulk, chunks for size.

Numpy arrays are CBOR typed arrays (RFC 8746): tag 40 wraps ``[shape, typed]``
where ``typed`` is a little-endian typed-array tag around the raw bytes, so any
CBOR tool can read them and dtype and shape come back exactly. RFC 8746 has no
typed array of booleans, so a bool array's elements travel as a homogeneous array
(tag 41) of CBOR true and false. A numpy scalar travels as an array of shape ()
and comes back as one, with its dtype and bytes. Any other dtype (complex, object,
datetime, strings) is refused with an error naming where in the body it sits.

Received CBOR is untrusted: before anything is decoded, its headers are walked
without building a value, so a header that claims more items or bytes than the
message holds, nesting deeper than a body needs, more items than a body needs
(a short message of empty arrays would otherwise decode to gigabytes) or a tag
grbfl does not send is refused at the cost of reading the message once.

Every bulk payload travels in an envelope, split in numbered parts no larger than
the broker's chunk size; each part carries the digest of the whole, and the
receiver reassembles in any order and rejects a bad digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np

from .errors import PayloadTooLarge, WireError

log = logging.getLogger(__name__)

# RFC 8746 tags for little-endian typed arrays, and the multi-dimensional wrapper.
_TAG_NDARRAY = 40
_DTYPE_TAGS: dict[str, int] = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
_TAG_DTYPES = {
    tag: np.dtype(name).newbyteorder("<") for name, tag in _DTYPE_TAGS.items()
}
_TAG_HOMOGENEOUS = 41
# The only tags grbfl sends; cbor2 would otherwise build dates, sets, regular
# expressions and shared references from whatever a sender puts there.
_ALLOWED_TAGS = frozenset({_TAG_NDARRAY, _TAG_HOMOGENEOUS, *_DTYPE_TAGS.values()})

# A model state dict nests three levels; a ball set four. Twelve leaves room
# without letting a hostile payload recurse the decoder into the ground.
MAX_DEPTH = 12
# Longest dimension list an array may claim (ResNet conv weights have four).
_MAX_NDIM = 8
# Items (values, keys, tags) a body may hold. A ResNet-18 checkpoint holds about
# 900 and a ball report two per class; a typed array counts as a handful however
# large (a bool array, one per element). An empty CBOR array costs one byte on
# the wire and 64 once decoded, so this, not the byte limit, is what bounds the
# memory a decode can take.
MAX_ITEMS = 100_000
# A chunk envelope is one map of seven fields.
_ENVELOPE_ITEMS = 16
# No weight or BatchNorm statistic of a trained image classifier comes near this;
# a larger value is a broken or hostile update that would poison the average.
MAX_WEIGHT = 1e5
# Transfers that stay incomplete this long are dropped to bound memory.
STALE_TRANSFER_S = 600.0


def encode_json(obj: dict[str, Any]) -> bytes:
    """Compact, key-sorted JSON, readable in mosquitto_sub."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_json(payload: bytes, *, limit: int = 1 << 20) -> dict[str, Any]:
    """Parse a JSON object, refusing oversized or non-object bodies."""
    if len(payload) > limit:
        raise WireError(f"JSON body of {len(payload)} bytes exceeds {limit}")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError("JSON body is not an object")
    return obj


def _encode_default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    # Only arrays reach here: _prepare has turned scalars into arrays and refused
    # everything else, naming where it sat.
    if not isinstance(value, np.ndarray):
        raise WireError(f"cannot encode {type(value).__name__} as CBOR")
    shape = list(value.shape)
    if value.dtype == np.bool_:
        flat = cbor2.CBORTag(_TAG_HOMOGENEOUS, value.ravel().tolist())
        encoder.encode(cbor2.CBORTag(_TAG_NDARRAY, [shape, flat]))
        return
    name = value.dtype.name
    data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    typed = cbor2.CBORTag(_DTYPE_TAGS[name], data.tobytes())
    encoder.encode(cbor2.CBORTag(_TAG_NDARRAY, [shape, typed]))


def _prepare(value: Any, path: str) -> Any:
    """value with numpy scalars as 0-d arrays; WireError naming the path of
    anything the wire cannot carry exactly."""
    if isinstance(value, np.generic):
        # Before the plain types: np.float64 is a float and would lose its dtype.
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name not in _DTYPE_TAGS and value.dtype != np.bool_:
            raise WireError(
                f"cannot send {path or 'the body'}: arrays of dtype {name} have no "
                "wire form (allowed: bool, " + ", ".join(_DTYPE_TAGS) + ")"
            )
        return value
    if isinstance(value, dict):
        return {
            key: _prepare(item, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_prepare(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    raise WireError(
        f"cannot send {path or 'the body'}: {type(value).__name__} has no wire form"
    )


def _decode_tag(*args: Any) -> Any:
    # cbor2 5 calls tag_hook(decoder, tag); cbor2 6 calls tag_hook(tag, immutable).
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    if tag.tag in _TAG_DTYPES:
        if not isinstance(tag.value, bytes):
            raise WireError(f"typed array tag {tag.tag} does not hold bytes")
        dtype = _TAG_DTYPES[tag.tag]
        if len(tag.value) % dtype.itemsize:
            raise WireError(f"typed array of {len(tag.value)} bytes is not whole")
        return np.frombuffer(tag.value, dtype=dtype).astype(dtype.newbyteorder("="))
    if tag.tag == _TAG_HOMOGENEOUS:
        items = tag.value
        if not isinstance(items, list | tuple) or not all(
            isinstance(item, bool) for item in items
        ):
            raise WireError("homogeneous array tag holds something besides booleans")
        return np.array(items, dtype=np.bool_)
    if tag.tag == _TAG_NDARRAY:
        value = tag.value
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not isinstance(value[0], list | tuple)
            or not isinstance(value[1], np.ndarray)
        ):
            raise WireError("multi-dimensional array tag is malformed")
        shape = list(value[0])
        if len(shape) > _MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WireError(f"array shape {shape!r} is invalid")
        flat = value[1]
        if math.prod(shape) != flat.size:
            raise WireError(
                f"array shape {shape} does not match its {flat.size} elements"
            )
        return flat.reshape(shape)
    raise WireError(f"unexpected CBOR tag {tag.tag}")


def encode_cbor(obj: Any) -> bytes:
    """CBOR with numpy arrays as typed arrays; WireError naming the key path of
    a value that cannot travel exactly (e.g. "state.conv1.weight")."""
    prepared = _prepare(obj, "")
    try:
        return cbor2.dumps(prepared, default=_encode_default)
    except WireError:
        raise
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise WireError(f"cannot encode payload: {exc}") from exc


def _malformed(detail: str) -> WireError:
    return WireError(f"malformed CBOR: {detail}")


def check_structure(
    payload: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS
) -> None:
    """Walk the CBOR headers of payload without building anything.

    WireError when a header claims more bytes or items than follow, when nesting
    or item count exceed the bounds, on a tag grbfl does not send, on reserved
    header values and on trailing bytes. Costs one pass over the headers: byte
    and text strings are stepped over, not read.
    """
    end = len(payload)
    pos = 0
    items = 0
    # Items still expected at each open level; -1 for an indefinite length.
    expected = [1]
    while expected:
        if expected[-1] == 0:
            expected.pop()
            continue
        if pos >= end:
            raise _malformed(f"ends early at byte {pos}")
        initial = payload[pos]
        pos += 1
        if initial == 0xFF:
            if expected[-1] != -1:
                raise _malformed(f"break outside an indefinite item at {pos - 1}")
            expected.pop()
            continue
        if expected[-1] > 0:
            expected[-1] -= 1
        items += 1
        if items > max_items:
            raise _malformed(f"holds more than {max_items} items")
        major, info = initial >> 5, initial & 0x1F

        # The header's argument: a count, a length, a tag number or a value.
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if pos + width > end:
                raise _malformed(f"ends inside a header at byte {pos}")
            arg = int.from_bytes(payload[pos : pos + width], "big")
            pos += width
        elif info == 31 and major in (2, 3, 4, 5):
            arg = -1
        else:
            raise _malformed(f"reserved header 0x{initial:02x} at byte {pos - 1}")

        left = end - pos
        if major in (2, 3):
            if arg == -1:
                expected.append(-1)  # definite-length chunks until a break
            elif arg > left:
                kind = "byte" if major == 2 else "text"
                raise _malformed(f"{kind} string claims {arg} bytes; {left} follow")
            else:
                pos += arg
        elif major in (4, 5):
            count = arg * (2 if major == 5 and arg != -1 else 1)
            # Every item takes at least one byte, so a count beyond what is left
            # is a lie, whatever a decoder would do with it.
            if count > left:
                kind = "array" if major == 4 else "map"
                raise _malformed(f"{kind} claims {arg} items; {left} bytes follow")
            expected.append(count)
        elif major == 6:
            if arg not in _ALLOWED_TAGS:
                raise _malformed(f"unexpected CBOR tag {arg}")
            expected.append(1)
        if len(expected) > max_depth + 1:
            raise _malformed(f"nests deeper than {max_depth} levels")
    if pos != end:
        raise _malformed(f"{end - pos} bytes of trailing data after the CBOR item")


def decode_cbor(
    payload: bytes,
    *,
    limit: int,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
) -> Any:
    """Decode CBOR after checking its size and structure; every failure becomes
    WireError."""
    if len(payload) > limit:
        raise WireError(f"CBOR body of {len(payload)} bytes exceeds limit {limit}")
    check_structure(payload, max_depth=max_depth, max_items=max_items)
    try:
        return cbor2.loads(payload, tag_hook=_decode_tag, max_depth=max_depth)
    except WireError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        # cbor2 wraps what our tag hook raised; surface our own message.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, WireError):
            raise cause from exc
        raise WireError(f"malformed CBOR: {exc}") from exc


# --- chunked transfers -----------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One numbered piece of a transfer, as it travels."""

    xfer: str
    index: int
    count: int
    size: int
    digest: str
    data: bytes


def digest_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def split(body: bytes, chunk_bytes: int, *, xfer: str | None = None) -> list[bytes]:
    """Wrap a body in one or more envelope messages of at most chunk_bytes data."""
    digest = digest_of(body)
    xfer = xfer or uuid.uuid4().hex
    count = max(1, math.ceil(len(body) / chunk_bytes))
    return [
        cbor2.dumps(
            {
                "v": 1,
                "xfer": xfer,
                "part": i,
                "parts": count,
                "size": len(body),
                "sha256": digest,
                "data": body[i * chunk_bytes : (i + 1) * chunk_bytes],
            }
        )
        for i in range(count)
    ]


def parse_part(message: bytes, *, max_payload: int) -> Part:
    """Check one envelope message; raise WireError when it cannot be a part."""
    envelope = decode_cbor(
        message, limit=max_payload + 4096, max_depth=2, max_items=_ENVELOPE_ITEMS
    )
    if not isinstance(envelope, dict) or envelope.get("v") != 1:
        raise WireError("not a grbfl envelope (version 1)")
    try:
        part = Part(
            xfer=envelope["xfer"],
            index=envelope["part"],
            count=envelope["parts"],
            size=envelope["size"],
            digest=envelope["sha256"],
            data=envelope["data"],
        )
    except KeyError as exc:
        raise WireError(f"envelope lacks field {exc.args[0]!r}") from exc
    checks = (
        (isinstance(part.xfer, str) and 0 < len(part.xfer) <= 128, "xfer"),
        (isinstance(part.size, int) and part.size >= 0, "size"),
        # Every part but that of an empty body carries at least one byte.
        (isinstance(part.count, int) and 1 <= part.count <= max(1, part.size), "parts"),
        (isinstance(part.index, int) and 0 <= part.index < part.count, "part"),
        (isinstance(part.digest, str) and len(part.digest) == 64, "sha256"),
        (isinstance(part.data, bytes) and len(part.data) <= part.size, "data"),
    )
    for ok, name in checks:
        if not ok:
            raise WireError(f"envelope field {name!r} is invalid")
    if part.size > max_payload:
        raise PayloadTooLarge(
            f"transfer {part.xfer}: announced size {part.size} bytes is above the "
            f"limit of {max_payload} (broker.max_payload_bytes)",
            xfer=part.xfer,
            size=part.size,
            limit=max_payload,
        )
    return part


@dataclass
class _Pending:
    count: int
    size: int
    digest: str
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0
    started: float = field(default_factory=time.monotonic)


# Oversized transfers remembered per source, so that each costs one warning
# rather than one per part.
_REFUSED_KEPT = 64


class Reassembler:
    """Collects parts from one source until a transfer is whole and verified.

    Holds at most max_payload bytes of incomplete transfers: a source that
    starts more drops its oldest, so memory stays bounded whatever it sends.
    """

    def __init__(self, max_payload: int, max_pending: int = 4) -> None:
        self.max_payload = max_payload
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self._refused: dict[str, None] = {}
        # Seconds from the first part of the last completed transfer to its last.
        self.last_seconds = 0.0

    def add(self, message: bytes) -> tuple[str, bytes] | None:
        """Feed one message; return (digest, body) when its transfer completes.

        WireError for a message that is not a usable part; a transfer announcing
        more than max_payload raises PayloadTooLarge for its first part only and
        its later parts are dropped without a word.
        """
        try:
            part = parse_part(message, max_payload=self.max_payload)
        except PayloadTooLarge as exc:
            if exc.xfer in self._refused:
                log.debug("dropping another part of refused transfer %s", exc.xfer)
                return None
            self._refused[exc.xfer] = None
            while len(self._refused) > _REFUSED_KEPT:
                del self._refused[next(iter(self._refused))]
            raise
        self._expire()
        pending = self._pending.get(part.xfer)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda k: self._pending[k].started)
                log.warning("dropping incomplete transfer %s for a newer one", oldest)
                del self._pending[oldest]
            pending = _Pending(part.count, part.size, part.digest)
            self._pending[part.xfer] = pending
        elif (pending.count, pending.size, pending.digest) != (
            part.count,
            part.size,
            part.digest,
        ):
            del self._pending[part.xfer]
            raise WireError(f"transfer {part.xfer}: parts disagree on their whole")
        if part.index not in pending.parts:
            pending.received += len(part.data)
            if pending.received > pending.size:
                del self._pending[part.xfer]
                raise WireError(f"transfer {part.xfer}: more data than announced")
            pending.parts[part.index] = part.data
            self._bound_pending(keep=part.xfer)
        if len(pending.parts) < pending.count:
            return None

        # Whole: join in order and verify before anyone decodes it.
        del self._pending[part.xfer]
        self.last_seconds = time.monotonic() - pending.started
        body = b"".join(pending.parts[i] for i in range(pending.count))
        if len(body) != pending.size or digest_of(body) != pending.digest:
            raise WireError(f"transfer {part.xfer}: digest or size mismatch")
        return pending.digest, body

    def _bound_pending(self, keep: str) -> None:
        """Drop the oldest other transfers while the bytes held exceed the limit."""
        while len(self._pending) > 1:
            held = sum(p.received for p in self._pending.values())
            if held <= self.max_payload:
                return
            oldest = min(
                (k for k in self._pending if k != keep),
                key=lambda k: self._pending[k].started,
            )
            log.warning(
                "dropping incomplete transfer %s: transfers in progress hold %d bytes, "
                "above %d",
                oldest,
                held,
                self.max_payload,
            )
            del self._pending[oldest]

    def _expire(self) -> None:
        now = time.monotonic()
        for xfer in [
            k for k, p in self._pending.items() if now - p.started > STALE_TRANSFER_S
        ]:
            log.warning(
                "dropping transfer %s: incomplete after %.0f s", xfer, STALE_TRANSFER_S
            )
            del self._pending[xfer]


# --- validation of decoded bodies ------------------------------------------------


def require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Fetch obj[key] and check its type, naming the field on failure."""
    if not isinstance(obj, dict) or key not in obj:
        raise WireError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int and isinstance(value, bool):
        raise WireError(f"{where}: field {key!r} must be an integer")
    if not isinstance(value, kind):
        raise WireError(f"{where}: field {key!r} has the wrong type")
    return value


def check_state(
    state: Any, reference: dict[str, np.ndarray], where: str
) -> dict[str, np.ndarray]:
    """Validate a received weight dict against the expected names, shapes, dtypes."""
    if not isinstance(state, dict):
        raise WireError(f"{where}: weights are not a map")
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise WireError(
            f"{where}: weight names differ (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, ref in reference.items():
        value = state[name]
        if not isinstance(value, np.ndarray):
            raise WireError(f"{where}: weight {name!r} is not an array")
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise WireError(
                f"{where}: weight {name!r} is {value.dtype}{list(value.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        if value.dtype.kind == "f" and value.size and not _surely_bounded(value):
            # NaN and infinities carry through max and min.
            high, low = float(value.max()), float(value.min())
            if not (math.isfinite(high) and math.isfinite(low)):
                raise WireError(f"{where}: weight {name!r} holds NaN or infinity")
            if max(high, -low) > MAX_WEIGHT:
                raise WireError(
                    f"{where}: weight {name!r} has a value above {MAX_WEIGHT:g}"
                )
    return state


def _surely_bounded(value: np.ndarray) -> bool:
    """Whether every element is finite and within MAX_WEIGHT, by one dot product.

    NaN and infinity make the sum of squares non-finite, and no element can exceed
    its square root; a sum that says neither (it may also overflow, or merely be
    large) leaves the exact check to max and min, two passes instead of one. The
    sum is taken against a quarter of the bound: float32 rounding of a sum of
    millions of non-negative terms stays far below that margin.
    """
    flat = value.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # both only send it on
        squares = float(np.dot(flat, flat))
    return math.isfinite(squares) and squares <= 0.25 * MAX_WEIGHT * MAX_WEIGHT


def iter_arrays(obj: Any, path: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Every numpy array inside a decoded body, with a path naming it."""
    if isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_arrays(value, f"{path}/{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from iter_arrays(value, f"{path}/{i}")
