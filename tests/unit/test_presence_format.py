"""The sidecar layout: round trips, and every corruption is detected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.errors import PresenceCorrupt
from cachefilesd_py.presence import format as fmt

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
