"""The wire format: exact arrays, bounded decoding, chunked transfers."""

from __future__ import annotations

import random

import cbor2
import numpy as np
import pytest

from grbfl import wire
from grbfl.errors import WireError


@pytest.mark.parametrize(
    "dtype",
    ["uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"],
)
def test_arrays_come_back_with_the_same_dtype_shape_and_values(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    back = wire.decode_cbor(wire.encode_cbor({"a": array}), limit=1 << 20)["a"]
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_scalar_and_empty_arrays_survive() -> None:
    body = {"s": np.array(7, dtype=np.int64), "e": np.zeros((0, 3), np.float32)}
    back = wire.decode_cbor(wire.encode_cbor(body), limit=1 << 20)
    assert back["s"].shape == () and int(back["s"]) == 7
    assert back["e"].shape == (0, 3)


def test_arrays_are_rfc8746_typed_arrays() -> None:
    raw = cbor2.loads(wire.encode_cbor(np.arange(4, dtype=np.float32)))
    assert raw.tag == 40
    assert list(raw.value[0]) == [4]
    assert raw.value[1].tag == 85  # float32, little-endian


def test_oversized_payload_is_refused_before_decoding() -> None:
    payload = wire.encode_cbor({"a": np.zeros(1000, np.float32)})
    with pytest.raises(WireError, match="exceeds limit"):
        wire.decode_cbor(payload, limit=100)


def test_deep_nesting_is_refused() -> None:
    nested: list = []
    for _ in range(50):
        nested = [nested]
    with pytest.raises(WireError):
        wire.decode_cbor(cbor2.dumps(nested), limit=1 << 20)


def test_shape_that_disagrees_with_the_data_is_refused() -> None:
    bad = cbor2.dumps(cbor2.CBORTag(40, [[3, 3], cbor2.CBORTag(85, b"\0" * 8)]))
    with pytest.raises(WireError, match="does not match"):
        wire.decode_cbor(bad, limit=1 << 20)


def test_unknown_tag_is_refused() -> None:
    with pytest.raises(WireError, match="unexpected CBOR tag"):
        wire.decode_cbor(cbor2.dumps(cbor2.CBORTag(999, 1)), limit=1 << 20)


def test_garbage_is_a_wire_error_not_a_crash() -> None:
    with pytest.raises(WireError):
        wire.decode_cbor(b"\xff\x00\x13garbage", limit=1 << 20)


def test_chunks_reassemble_in_any_order() -> None:
    body = random.Random(1).randbytes(10_000)
    parts = wire.split(body, 1024)
    assert len(parts) == 10
    random.Random(2).shuffle(parts)
    assembler = wire.Reassembler(max_payload=1 << 20)
    results = [assembler.add(p) for p in parts]
    assert all(r is None for r in results[:-1])
    digest, whole = results[-1]  # type: ignore[misc]
    assert whole == body
    assert digest == wire.digest_of(body)


def test_a_tampered_chunk_fails_the_digest() -> None:
    body = bytes(range(256)) * 10
    parts = wire.split(body, 1000)
    envelope = cbor2.loads(parts[1])
    envelope["data"] = bytes(len(envelope["data"]))
    parts[1] = cbor2.dumps(envelope)
    assembler = wire.Reassembler(max_payload=1 << 20)
    assembler.add(parts[0])
    assembler.add(parts[1])
    with pytest.raises(WireError, match="digest"):
        assembler.add(parts[2])


def test_duplicate_chunks_are_harmless() -> None:
    body = b"x" * 3000
    parts = wire.split(body, 1000)
    assembler = wire.Reassembler(max_payload=1 << 20)
    assert assembler.add(parts[0]) is None
    assert assembler.add(parts[0]) is None
    assert assembler.add(parts[1]) is None
    assert assembler.add(parts[2]) == (wire.digest_of(body), body)


def test_a_transfer_announcing_more_than_the_limit_is_refused() -> None:
    parts = wire.split(b"y" * 5000, 1000)
    with pytest.raises(WireError, match="size"):
        wire.Reassembler(max_payload=4000).add(parts[0])


def test_state_check_names_the_bad_weight() -> None:
    reference = {"w": np.zeros((2, 2), np.float32), "n": np.zeros((), np.int64)}
    bad = {
        "w": np.array([[0, np.nan], [0, 0]], np.float32),
        "n": np.zeros((), np.int64),
    }
    with pytest.raises(WireError, match="'w' holds NaN"):
        wire.check_state(bad, reference, "update from p1")
    wrong_shape = {"w": np.zeros((3, 2), np.float32), "n": np.zeros((), np.int64)}
    with pytest.raises(WireError, match="'w' is float32\\[3, 2\\]"):
        wire.check_state(wrong_shape, reference, "update from p1")
    with pytest.raises(WireError, match="missing"):
        wire.check_state({"w": reference["w"]}, reference, "update from p1")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_state_check_bounds_every_weight_exactly(dtype: str) -> None:
    """One value just past MAX_WEIGHT among many small ones is refused, one just
    within it passes, and an infinity is named as such, for every float width."""
    reference = {"w": np.zeros(100_000, dtype)}
    limit = min(wire.MAX_WEIGHT, float(np.finfo(dtype).max))
    within = np.full(100_000, 0.5, dtype)
    within[7] = np.asarray(limit, dtype)
    assert wire.check_state({"w": within}, reference, "p1")["w"] is within

    above = np.full(100_000, 0.5, dtype)
    if float(np.finfo(dtype).max) > wire.MAX_WEIGHT:  # float16 tops out below it
        above[7] = np.nextafter(np.asarray(limit, dtype), np.asarray(np.inf, dtype))
        with pytest.raises(WireError, match="'w' has a value above"):
            wire.check_state({"w": above}, reference, "p1")
    above[7] = -np.inf
    with pytest.raises(WireError, match="'w' holds NaN or infinity"):
        wire.check_state({"w": above}, reference, "p1")
