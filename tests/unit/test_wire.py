"""The on-demand wire codec: golden bytes, round-trips, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.frontends.ondemand import wire

u32 = st.integers(0, 2**32 - 1)
volume_keys = st.binary(min_size=0, max_size=255).filter(lambda b: b"\0" not in b)
cookie_keys = st.binary(min_size=1, max_size=255)


def header(msg_id: int, opcode: int, length: int, object_id: int) -> bytes:
    return struct.pack("=IIII", msg_id, opcode, length, object_id)


def open_msg(vks: int, cks: int, data: bytes, *, length: int | None = None) -> bytes:
    body = struct.pack("=IIII", vks, cks, 3, 0) + data
    return header(1, 0, 16 + len(body) if length is None else length, 1) + body


# -- golden messages ---------------------------------------------------------------------


def test_open_worked_example_has_len_55() -> None:
    """fsid test.img, no domain: vks 15 (with the NUL), cks 8, len 32+15+8 = 55
    (docs/protocol-ondemand.md §4.1)."""
    raw = (
        struct.pack("=IIII", 7, 0, 55, 3)
        + struct.pack("=IIII", 15, 8, 9, 0)
        + b"erofs,test.img\0"
        + b"test.img"
    )
    assert len(raw) == 55
    req = wire.decode(raw)
    assert req == wire.OpenRequest(7, 3, b"erofs,test.img", b"test.img", 9, 0)
    assert wire.encode_message(req) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            struct.pack("=IIIIQQ", 1, 2, 32, 4, 8192, 131072),
            wire.ReadRequest(1, 4, 8192, 131072),
        ),
        (
            struct.pack("=IIIIQQ", 2**32 - 1, 2, 32, 2**31 - 1, 2**63, 2**63 - 1),
            wire.ReadRequest(2**32 - 1, 2**31 - 1, 2**63, 2**63 - 1),
        ),
        (struct.pack("=IIII", 5, 1, 16, 4), wire.CloseRequest(5, 4)),
        (struct.pack("=IIII", 6, 1, 16, 0xFFFFFFFF), wire.CloseRequest(6, 0xFFFFFFFF)),
        (
            open_msg(2, 3, b"x\0" + b"a\0b"),
            wire.OpenRequest(1, 1, b"x", b"a\0b", 3, 0),
        ),
        (open_msg(1, 1, b"\0k"), wire.OpenRequest(1, 1, b"", b"k", 3, 0)),
    ],
)
def test_golden_messages(raw: bytes, expected: wire.Request) -> None:
    assert wire.decode(raw) == expected
    assert wire.decode(bytearray(raw)) == expected
    assert wire.decode(memoryview(raw)) == expected
    assert wire.encode_message(expected) == raw


def test_struct_sizes_match_the_uapi() -> None:
    assert (wire.HEADER.size, wire.OPEN.size, wire.READ.size) == (16, 16, 16)
    assert (wire.OPEN_LEN_MIN, wire.READ_LEN, wire.CLOSE_LEN) == (32, 32, 16)


def test_largest_open_fits_the_kernels_message_limit() -> None:
    req = wire.OpenRequest(1, 1, b"v" * 255, b"c" * 255, 3, 0)
    assert len(wire.encode_message(req)) == 32 + 256 + 255 <= wire.MSG_MAX_SIZE


def test_cookie_key_is_bytes_not_a_c_string() -> None:
    cookie = b"a\0b\xff"
    req = wire.OpenRequest(1, 1, b"erofs,x", cookie, 5, 0)
    assert wire.decode(wire.encode_message(req)).cookie_key == cookie


# -- round trips ---------------------------------------------------------------------------


@given(u32, u32, volume_keys, cookie_keys, u32, u32)
def test_open_round_trip(
    msg_id: int, obj: int, vol: bytes, cookie: bytes, fd: int, flags: int
) -> None:
    req = wire.OpenRequest(msg_id, obj, vol, cookie, fd, flags)
    raw = wire.encode_message(req)
    assert len(raw) == 32 + len(vol) + 1 + len(cookie)
    assert wire.decode(raw) == req


@given(u32, u32, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_read_round_trip_or_overflow(msg_id: int, obj: int, off: int, length: int) -> None:
    raw = wire.encode_message(wire.ReadRequest(msg_id, obj, off, length))
    if off + length < 2**64:
        assert wire.decode(raw) == wire.ReadRequest(msg_id, obj, off, length)
    else:
        with pytest.raises(KernelProtocolError, match="overflows"):
            wire.decode(raw)


@given(u32, u32)
def test_close_round_trip(msg_id: int, obj: int) -> None:
    assert wire.decode(wire.encode_message(wire.CloseRequest(msg_id, obj))) == (
        wire.CloseRequest(msg_id, obj)
    )


# -- malformed input -------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_garbage_raises_only_protocol_errors(buf: bytes) -> None:
    try:
        req = wire.decode(buf)
    except KernelProtocolError:
        return
    assert wire.encode_message(req) == buf, "a decoded message must be canonical"


@given(st.binary(max_size=64), u32, st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]), u32)
def test_garbage_with_a_consistent_length(tail: bytes, msg_id: int, op: int, obj: int) -> None:
    """Headers whose len is right get past the first check: the rest must still hold."""
    buf = header(msg_id, op, 16 + len(tail), obj) + tail
    try:
        req = wire.decode(buf)
    except KernelProtocolError:
        return
    assert wire.encode_message(req) == buf


@pytest.mark.parametrize(
    ("buf", "why"),
    [
        (b"", "shorter than its header"),
        (b"\0" * 15, "shorter than its header"),
        (header(1, 2, 40, 1) + b"\0" * 16, "header len 40"),
        (header(1, 2, 16, 1) + b"\0" * 16, "header len 16"),
        (header(1, 9, 16, 1), "unknown opcode 9"),
        (header(1, 1, 20, 1) + b"\0" * 4, "CLOSE of 20"),
        (header(1, 2, 24, 1) + b"\0" * 8, "READ of 24"),
        (header(1, 2, 40, 1) + b"\0" * 24, "READ of 40"),
        (struct.pack("=IIIIQQ", 1, 2, 32, 1, 2**64 - 1, 1), "overflows"),
        (struct.pack("=IIIIQQ", 1, 2, 32, 1, 2**63, 2**63), "overflows"),
        (header(1, 0, 20, 1) + b"\0" * 4, "shorter than its payload"),
        (open_msg(0, 1, b"a"), "volume_key_size 0"),
        (open_msg(257, 1, b"x" * 257 + b"c"), "volume_key_size 257"),
        (open_msg(2, 0, b"a\0"), "cookie_key_size 0"),
        (open_msg(2, 256, b"a\0" + b"c" * 256), "cookie_key_size 256"),
        (open_msg(3, 1, b"ab\0cd"), "do not add up"),
        (open_msg(3, 3, b"ab\0c"), "do not add up"),
        (open_msg(3, 1, b"abcd"), "not NUL-terminated"),
        (open_msg(3, 1, b"a\0\0d"), "NUL before its end"),
    ],
)
def test_malformed_messages(buf: bytes, why: str) -> None:
    with pytest.raises(KernelProtocolError, match=why):
        wire.decode(buf)


@pytest.mark.parametrize(
    "req",
    [
        wire.OpenRequest(1, 1, b"a\0b", b"c", 3, 0),
        wire.OpenRequest(1, 1, b"v" * 256, b"c", 3, 0),
        wire.OpenRequest(1, 1, b"v", b"", 3, 0),
        wire.OpenRequest(1, 1, b"v", b"c" * 256, 3, 0),
    ],
)
def test_encoder_refuses_what_the_kernel_cannot_send(req: wire.Request) -> None:
    with pytest.raises(ValueError):
        wire.encode_message(req)
