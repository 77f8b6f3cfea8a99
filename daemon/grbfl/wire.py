"""What travels on the broker: JSON for people, CBOR for bulk, chunks for size.

Numpy arrays are CBOR typed arrays (RFC 8746): tag 40 wraps ``[shape, typed]``
where ``typed`` is a little-endian typed-array tag around the raw bytes, so any
CBOR tool can read them and dtype and shape come back exactly.

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

from .errors import WireError

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

# A model state dict nests three levels; a ball set four. Twelve leaves room
# without letting a hostile payload recurse the decoder into the ground.
MAX_DEPTH = 12
# Longest dimension list an array may claim (ResNet conv weights have four).
_MAX_NDIM = 8
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
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name not in _DTYPE_TAGS:
            raise WireError(f"cannot send arrays of dtype {name}")
        data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        typed = cbor2.CBORTag(_DTYPE_TAGS[name], data.tobytes())
        encoder.encode(cbor2.CBORTag(_TAG_NDARRAY, [list(value.shape), typed]))
    elif isinstance(value, np.generic):
        encoder.encode(value.item())
    else:
        raise WireError(f"cannot encode {type(value).__name__} as CBOR")


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
    """CBOR with numpy arrays as typed arrays."""
    try:
        return cbor2.dumps(obj, default=_encode_default)
    except WireError:
        raise
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise WireError(f"cannot encode payload: {exc}") from exc


def decode_cbor(payload: bytes, *, limit: int, max_depth: int = MAX_DEPTH) -> Any:
    """Decode CBOR after checking its size; every failure becomes WireError."""
    if len(payload) > limit:
        raise WireError(f"CBOR body of {len(payload)} bytes exceeds limit {limit}")
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
    envelope = decode_cbor(message, limit=max_payload + 4096, max_depth=2)
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
        (isinstance(part.count, int) and part.count >= 1, "parts"),
        (isinstance(part.index, int) and 0 <= part.index < part.count, "part"),
        (isinstance(part.size, int) and 0 <= part.size <= max_payload, "size"),
        (isinstance(part.digest, str) and len(part.digest) == 64, "sha256"),
        (isinstance(part.data, bytes) and len(part.data) <= part.size, "data"),
    )
    for ok, name in checks:
        if not ok:
            raise WireError(f"envelope field {name!r} is invalid")
    return part


@dataclass
class _Pending:
    count: int
    size: int
    digest: str
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0
    started: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collects parts from one source until a transfer is whole and verified."""

    def __init__(self, max_payload: int, max_pending: int = 4) -> None:
        self.max_payload = max_payload
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        # Seconds from the first part of the last completed transfer to its last.
        self.last_seconds = 0.0

    def add(self, message: bytes) -> tuple[str, bytes] | None:
        """Feed one message; return (digest, body) when its transfer completes."""
        part = parse_part(message, max_payload=self.max_payload)
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
        if len(pending.parts) < pending.count:
            return None

        # Whole: join in order and verify before anyone decodes it.
        del self._pending[part.xfer]
        self.last_seconds = time.monotonic() - pending.started
        body = b"".join(pending.parts[i] for i in range(pending.count))
        if len(body) != pending.size or digest_of(body) != pending.digest:
            raise WireError(f"transfer {part.xfer}: digest or size mismatch")
        return pending.digest, body

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
        if value.dtype.kind == "f":
            if not np.isfinite(value).all():
                raise WireError(f"{where}: weight {name!r} holds NaN or infinity")
            if value.size and float(np.abs(value).max()) > MAX_WEIGHT:
                raise WireError(
                    f"{where}: weight {name!r} has a value above {MAX_WEIGHT:g}"
                )
    return state


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
