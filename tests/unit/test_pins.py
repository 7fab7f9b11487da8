"""The run-time pin set (``space/pins.py``): its state file round trip, a corrupt
file read as no pins with one clear log line, and the cap arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.space.pins import (
    PIN_FILE_NAME,
    Pin,
    PinFileCorrupt,
    PinSet,
    PinStore,
    check_cap,
)

_names = st.tuples(
    st.text(
        st.characters(blacklist_characters="\0/", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ),
    st.text(
        st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ),
).map(lambda vc: f"{vc[0]}/{vc[1]}")


@given(st.dictionaries(_names, st.tuples(st.integers(0, 2**62), st.floats(0, 2e9)), max_size=8))
def test_encode_decode_round_trip(entries: dict[str, tuple[int, float]]) -> None:
    pins = PinSet(tuple(Pin(n, s, a) for n, (s, a) in entries.items()))
    back = PinSet.decode(pins.encode())
    assert sorted(back.pins, key=lambda p: p.blob) == sorted(pins.pins, key=lambda p: p.blob)
    assert back.total == sum(s for s, _a in entries.values())


def test_store_persists_across_instances(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    assert store.pin("erofs,img/img", 1000, 10_000, 50).allowed
    assert store.pin("erofs,b/b", 2000, 10_000, 50).allowed
    assert store.unpin("erofs,b/b") and not store.unpin("erofs,b/b")
    again = PinStore(tmp_path)
    assert again.snapshot().names() == {"erofs,img/img"}
    assert again.snapshot().get("erofs,img/img").size == 1000  # type: ignore[union-attr]
    # no temporary file left behind by the durable save
    assert sorted(p.name for p in tmp_path.iterdir()) == [PIN_FILE_NAME]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"version": 2, "pins": {}}).encode(),
        json.dumps({"version": 1, "pins": []}).encode(),
        json.dumps({"version": 1, "pins": {"noslash": {"size": 1, "at": 0}}}).encode(),
        json.dumps({"version": 1, "pins": {"a/b": {"size": -1, "at": 0}}}).encode(),
        json.dumps({"version": 1, "pins": {"a/b": {"size": True, "at": 0}}}).encode(),
        json.dumps({"version": 1, "pins": {"a/b": {"size": 1, "at": "x"}}}).encode(),
        json.dumps({"version": 1, "pins": {"a/b": 5}}).encode(),
        b'{"version": 1, "pins": {"a/b": {"size": 1, "at": NaN}}}',
    ],
)
def test_a_corrupt_file_is_no_pins_and_one_log_line(tmp_path: Path, content: bytes) -> None:
    (tmp_path / PIN_FILE_NAME).write_bytes(content)
    with pytest.raises(PinFileCorrupt):
        PinSet.decode(content)
    with capture_logs() as logs:
        store = PinStore(tmp_path)
    assert store.snapshot() == PinSet()
    [event] = [e for e in logs if e["event"] == "pins.corrupt"]
    assert event["log_level"] == "error" and event["file"] == str(tmp_path / PIN_FILE_NAME)
    # the next pin rewrites it
    assert store.pin("erofs,a/a", 1, 100, 50).allowed
    assert PinStore(tmp_path).snapshot().names() == {"erofs,a/a"}


def test_cap_arithmetic() -> None:
    # 50% of 1000: cap 500
    v = check_cap(total=300, already=0, size=200, cache_bytes=1000, share_pct=50)
    assert v.allowed and v.cap == 500 and v.total_after == 500 and v.warn
    v = check_cap(total=300, already=0, size=201, cache_bytes=1000, share_pct=50)
    assert not v.allowed and "over the cap of 500 bytes" in v.message
    v = check_cap(total=300, already=0, size=149, cache_bytes=1000, share_pct=50)
    assert v.allowed and not v.warn  # 449 < 90% of 500
    v = check_cap(total=300, already=0, size=150, cache_bytes=1000, share_pct=50)
    assert v.allowed and v.warn  # 450 = 90% of 500
    # re-pinning a blob replaces its size, it is not counted twice
    v = check_cap(total=500, already=400, size=400, cache_bytes=1000, share_pct=50)
    assert v.allowed and v.total_after == 500
    # a share of 0 refuses every pin but an empty one
    assert not check_cap(0, 0, 1, 1000, 0).allowed
    assert check_cap(0, 0, 0, 1000, 0).allowed


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 2**50), st.integers(0, 100))
def test_cap_verdicts_agree_with_the_share(total: int, size: int, cache: int, pct: int) -> None:
    v = check_cap(total, 0, size, cache, pct)
    assert v.allowed == (total + size <= cache * pct // 100)
    if v.allowed:
        assert v.warn == (total + size >= 0.9 * v.cap)


def test_refused_pin_changes_nothing(tmp_path: Path) -> None:
    store = PinStore(tmp_path)
    assert store.pin("erofs,a/a", 400, 1000, 50).allowed
    assert not store.pin("erofs,b/b", 101, 1000, 50).allowed
    assert PinStore(tmp_path).snapshot().names() == {"erofs,a/a"}


def test_pin_max_share_directive() -> None:
    base = "dir /var/cache/fscache\n"
    assert parse_config(base, "t.conf").pin_max_share == 50
    assert parse_config(base + "pin_max_share 30%\n", "t.conf").pin_max_share == 30
    assert parse_config(base + "pin_max_share 0\n", "t.conf").pin_max_share == 0
