"""The on-demand wire codec: golden bytes, round-trips, and garbage."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.frontends.ondemand import wire

u32 = st.integers(0, 2**32 - 1)
volume_keys = st.binary(min_size=0, max_size=255).filter(lambda b: b"\0" not in b)
cookie_keys = st.binary(min_size=1, max_size=255)


def test_open_golden_worked_example() -> None:
    """fsid test.img: vks 15 (with NUL), cks 8, total len 55 (protocol §3.2)."""
    raw = (
        struct.pack("=IIII", 7, 0, 55, 3)
        + struct.pack("=IIII", 15, 8, 9, 0)
        + b"erofs,test.img\0"
        + b"test.img"
    )
    req = wire.decode(raw)
    assert req == wire.OpenRequest(7, 3, b"erofs,test.img", b"test.img", 9, 0)
    assert wire.encode_message(req) == raw


def test_read_and_close_golden() -> None:
    raw = struct.pack("=IIIIQQ", 1, 2, 32, 4, 8192, 131072)
    assert wire.decode(raw) == wire.ReadRequest(1, 4, 8192, 131072)
    assert wire.decode(struct.pack("=IIII", 5, 1, 16, 4)) == wire.CloseRequest(5, 4)


def test_cookie_key_is_bytes_not_a_c_string() -> None:
    cookie = b"a\0b\xff"
    req = wire.OpenRequest(1, 1, b"erofs,x", cookie, 5, 0)
    assert wire.decode(wire.encode_message(req)).cookie_key == cookie


@given(u32, u32, volume_keys, cookie_keys, u32, u32)
def test_open_round_trip(msg_id, obj, vol, cookie, fd, flags) -> None:  # type: ignore[no-untyped-def]
    req = wire.OpenRequest(msg_id, obj, vol, cookie, fd, flags)
    assert wire.decode(wire.encode_message(req)) == req


@given(u32, u32, st.integers(0, 2**63), st.integers(0, 2**62))
def test_read_round_trip(msg_id, obj, off, length) -> None:  # type: ignore[no-untyped-def]
    req = wire.ReadRequest(msg_id, obj, off, length)
    assert wire.decode(wire.encode_message(req)) == req


@given(st.binary(max_size=600))
def test_garbage_only_raises_protocol_errors(buf: bytes) -> None:
    with contextlib.suppress(KernelProtocolError):
        wire.decode(buf)


def _open(vks: int, cks: int, payload: bytes, length: int | None = None) -> bytes:
    body = struct.pack("=IIII", vks, cks, 3, 0) + payload
    return struct.pack("=IIII", 1, 0, length if length is not None else 16 + len(body), 1) + body


@pytest.mark.parametrize(
    ("buf", "why"),
    [
        (b"", "shorter than its header"),
        (b"\0" * 15, "shorter than its header"),
        (struct.pack("=IIII", 1, 2, 40, 1) + b"\0" * 16, "header len"),
        (struct.pack("=IIII", 1, 9, 16, 1), "unknown opcode"),
        (struct.pack("=IIII", 1, 1, 20, 1) + b"\0" * 4, "CLOSE of 20"),
        (struct.pack("=IIII", 1, 2, 24, 1) + b"\0" * 8, "READ of 24"),
        (struct.pack("=IIIIQQ", 1, 2, 32, 1, 2**64 - 1, 2), "overflows"),
        (_open(0, 1, b"a"), "volume_key_size 0"),
        (_open(300, 1, b"x" * 301), "volume_key_size 300"),
        (_open(2, 0, b"a\0"), "cookie_key_size 0"),
        (_open(3, 1, b"ab\0cd"), "do not fill"),
        (_open(3, 1, b"abcd"), "NUL-terminated"),
        (_open(3, 1, b"a\0\0d"), "NUL-terminated"),
        (struct.pack("=IIII", 1, 0, 20, 1) + b"\0" * 4, "shorter than its payload"),
    ],
)
def test_malformed_messages(buf: bytes, why: str) -> None:
    with pytest.raises(KernelProtocolError, match=why):
        wire.decode(buf)


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (wire.encode_copen(7, 4096), b"copen 7,4096"),
        (wire.encode_copen(2**32 - 1, 0), b"copen 4294967295,0"),
        (wire.encode_copen(8, -2), b"copen 8,-2"),
        (wire.encode_bind(ondemand=True), b"bind ondemand"),
        (wire.encode_bind(ondemand=False), b"bind"),
        (wire.encode_restore(), b"restore"),
        (wire.encode_dir("/var/cache/fscache"), b"dir /var/cache/fscache"),
        (wire.encode_tag("mycache"), b"tag mycache"),
        (wire.encode_threshold("bcull", 7), b"bcull 7%"),
        (wire.encode_cull("Dimg.erofs"), b"cull Dimg.erofs"),
        (wire.encode_inuse("Dimg.erofs"), b"inuse Dimg.erofs"),
    ],
)
def test_command_encodings(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected
    assert b"\n" not in encoded


@given(u32, st.integers(0, 2**62))
def test_copen_never_zero_padded(msg_id: int, size: int) -> None:
    _, args = wire.encode_copen(msg_id, size).split(b" ")
    for number in args.split(b","):
        assert number == b"0" or not number.startswith(b"0")


@pytest.mark.parametrize(
    "call",
    [
        lambda: wire.encode_copen(-1, 5),
        lambda: wire.encode_copen(2**32, 5),
        lambda: wire.encode_copen(1, -4096),
        lambda: wire.encode_cull("a/b"),
        lambda: wire.encode_cull("x\ny"),
        lambda: wire.encode_tag(" padded"),
        lambda: wire.encode_dir(""),
        lambda: wire.encode_threshold("brun", 100),
        lambda: wire.encode_threshold("nope", 5),
    ],
)
def test_bad_command_arguments_are_refused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        call()
