"""The sidecar layout: round trips, and every corruption is detected."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.errors import PresenceCorrupt
from cachefilesd_py.presence import format as fmt
from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry
from cachefilesd_py.testing.sidecars import reseal

SC = fmt.Sidecar(
    262144,
    5_000_000,
    20,
    b"\x01" * 16,
    fmt.key_digest((b"erofs,a", b"a")),
    "5000000:abc",
    bytes([0xFF, 0x0F, 0x05]),
)


def test_round_trip() -> None:
    assert fmt.decode(fmt.encode(SC)) == SC


@given(st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    raw = bytearray(fmt.encode(SC))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PresenceCorrupt):
        fmt.decode(bytes(raw))


@given(st.integers(0, 200))
def test_truncation_is_detected(cut: int) -> None:
    raw = fmt.encode(SC)
    with pytest.raises(PresenceCorrupt):
        fmt.decode(raw[: min(cut, len(raw) - 1)])


# -- hostile sidecars: every decode problem is PresenceCorrupt, never anything else ----


def with_fields(**fields: int) -> bytes:
    """The encoding of SC with header fields overwritten, checksums recomputed."""
    raw = bytearray(fmt.encode(SC))
    values = list(fmt.HEAD.unpack_from(raw))
    names = ["magic", "version", "chunk", "size", "nchunks", "binding", "key_hash", "tlen"]
    for name, value in fields.items():
        values[names.index(name)] = value
    fmt.HEAD.pack_into(raw, 0, *values)
    return reseal(raw)


def accepted_sidecar_is_usable(sc: fmt.Sidecar) -> None:
    """What a caller does with a decoded sidecar must not raise."""
    geometry = ChunkGeometry(sc.blob_size, sc.chunk_size)
    assert geometry.nchunks == sc.nchunks
    ChunkBitmap(sc.nchunks, sc.bitmap)


def test_a_bit_past_the_last_chunk_is_corrupt_even_with_valid_checksums() -> None:
    # issue 10 item 10: decode accepted it and ChunkBitmap raised ValueError later,
    # on every OPEN of the blob
    raw = bytearray(fmt.encode(SC))
    bitmap_at = fmt.HEAD.size + len(SC.token) + 4
    raw[bitmap_at + 2] |= 0x80  # chunk 23 of 20
    with pytest.raises(PresenceCorrupt, match="past the last chunk"):
        fmt.decode(reseal(raw))


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"chunk": 0}, "chunk size"),
        ({"chunk": 3 << 16}, "chunk size"),
        ({"nchunks": 21}, "chunk count"),
        ({"nchunks": 19}, "chunk count"),
        ({"size": 1 << 40}, "chunk count"),
        ({"tlen": 0xFFFF}, "truncated"),
    ],
)
def test_inconsistent_geometry_with_valid_checksums_is_corrupt(
    fields: dict[str, int], why: str
) -> None:
    with pytest.raises(PresenceCorrupt, match=why):
        fmt.decode(with_fields(**fields))


def test_encode_refuses_what_decode_would_refuse() -> None:
    for bad in (
        replace(SC, bitmap=bytes([0xFF, 0x0F, 0x15])),  # bit past the end
        replace(SC, nchunks=21),
        replace(SC, chunk_size=3),
        replace(SC, token="x" * 0x10000),
        replace(SC, bitmap=b"\0"),
    ):
        with pytest.raises(ValueError):
            fmt.encode(bad)


def test_claimed_length_bounds_a_read_before_the_bitmap_is_read() -> None:
    raw = fmt.encode(SC)
    assert fmt.claimed_length(raw[: fmt.HEAD.size]) == len(raw)
    assert fmt.claimed_length(with_fields(nchunks=1 << 40)[: fmt.HEAD.size]) > 1 << 37
    with pytest.raises(PresenceCorrupt):
        fmt.claimed_length(b"BOOM" * 30)
    with pytest.raises(PresenceCorrupt):
        fmt.claimed_length(raw[:10])


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_to_a_usable_sidecar_or_corrupt(data: bytes) -> None:
    try:
        sc = fmt.decode(data)
    except PresenceCorrupt:
        return
    accepted_sidecar_is_usable(sc)


@st.composite
def mutated_sidecars(draw: st.DrawFn) -> bytes:
    """A valid sidecar with header fields, bitmap bytes or length changed, resealed."""
    nchunks = draw(st.integers(0, 70))
    chunk = 1 << draw(st.integers(0, 24))
    size = draw(st.integers(max(0, (nchunks - 1) * chunk + 1), nchunks * chunk))
    nbytes = (nchunks + 7) // 8
    bits = bytearray(draw(st.binary(min_size=nbytes, max_size=nbytes)))
    if nchunks % 8:
        bits[-1] &= (1 << (nchunks % 8)) - 1
    token = draw(st.text(max_size=20))
    sc = fmt.Sidecar(chunk, size, nchunks, b"\1" * 16, b"\2" * 32, token, bytes(bits))
    raw = bytearray(fmt.encode(sc))
    values = list(fmt.HEAD.unpack_from(raw))
    for index in draw(st.sets(st.integers(1, 7), max_size=3)):
        width = (32, 32, 64, 64)[index - 1] if index <= 4 else 16
        values[index] = draw(
            st.one_of(st.integers(0, 2**width - 1), st.integers(0, 300))
            if index not in (5, 6)
            else st.binary(min_size=(16, 32)[index - 5], max_size=(16, 32)[index - 5])
        )
    fmt.HEAD.pack_into(raw, 0, *values)
    for _ in range(draw(st.integers(0, 3))):
        if len(raw) > fmt.HEAD.size:
            pos = draw(st.integers(fmt.HEAD.size, len(raw) - 1))
            raw[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        raw += draw(st.binary(max_size=9))
    return reseal(raw) if draw(st.booleans()) else bytes(raw)


@settings(max_examples=1000)
@given(mutated_sidecars())
def test_mutated_valid_sidecars_decode_to_a_usable_sidecar_or_corrupt(raw: bytes) -> None:
    try:
        sc = fmt.decode(raw)
    except PresenceCorrupt:
        return
    accepted_sidecar_is_usable(sc)
    assert fmt.decode(fmt.encode(sc)) == sc
