"""The fanotify wire codec: bytes captured from the real 7.3 kernel, tables of malformed
records, round-trips, responses, and arbitrary bytes (hypothesis and the fuzz harness)."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.wire import Event, FileRange, MalformedEvent
from cachefilesd_py.kernel.fanotify import FAN_ACCESS, FAN_PRE_ACCESS, FAN_Q_OVERFLOW
from fuzz.fuzz_fanotify_wire import TestOneInput as fuzz_one_input

GOLDEN = Path(__file__).parent / "golden" / "fanotify"


def metadata(
    event_len: int,
    mask: int = FAN_PRE_ACCESS,
    fd: int = 7,
    pid: int = 42,
    *,
    vers: int = 3,
    metadata_len: int = 24,
) -> bytes:
    return struct.pack("=IBBHQii", event_len, vers, 0, metadata_len, mask, fd, pid)


def range_record(offset: int, count: int, *, length: int = 24, info_type: int = 6) -> bytes:
    return struct.pack("=BBHIQQ", info_type, 0, length, 0, offset, count)


def pre_access(offset: int, count: int, fd: int = 7, pid: int = 42) -> bytes:
    return metadata(48, FAN_PRE_ACCESS, fd, pid) + range_record(offset, count)


# -- bytes from the real kernel ----------------------------------------------------------


def golden_cases() -> list[tuple[str, dict[str, object]]]:
    index = json.loads((GOLDEN / "index.json").read_text())
    return sorted(index.items())


@pytest.mark.parametrize(("name", "expected"), golden_cases(), ids=lambda v: str(v)[:40])
def test_golden_bytes_from_the_7_3_kernel(name: str, expected: dict[str, object]) -> None:
    """Each file is one read() of a real group (tests/vm/capture_fanotify_golden.py);
    index.json says what the capturing program knew: which reads it made, which fds
    and pids the kernel reported."""
    raw = (GOLDEN / name).read_bytes()
    events = wire.decode_events(raw)
    got = [
        {
            "mask": e.mask,
            "fd": e.fd,
            "pid": e.pid,
            "range": None if e.range is None else [e.range.offset, e.range.count],
            "skipped_info": list(e.skipped_info),
        }
        for e in events
    ]
    assert got == expected["events"]
    # and the codec writes the same bytes back, byte for byte
    rebuilt = b"".join(
        wire.encode_event(
            e.mask, e.fd, e.pid, e.range, [(t, raw_info) for t, raw_info in _infos(raw, i)]
        )
        for i, e in enumerate(events)
    )
    assert rebuilt == raw


def _infos(raw: bytes, index: int) -> list[tuple[int, bytes]]:
    """The non-range info records of event ``index`` in ``raw``, as (type, body)."""
    pos = 0
    for _ in range(index):
        pos += struct.unpack_from("=I", raw, pos)[0]
    event_len = struct.unpack_from("=I", raw, pos)[0]
    out = []
    p = pos + 24
    while p < pos + event_len:
        t, _pad, n = struct.unpack_from("=BBH", raw, p)
        if t != 6:
            out.append((t, raw[p + 4 : p + n]))
        p += n
    return out


# -- tables ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", []),
        (pre_access(0, 4096), [Event(FAN_PRE_ACCESS, 7, 42, FileRange(0, 4096))]),
        (
            pre_access(8192, 0, fd=3) + pre_access(2**63, 2**64 - 1, fd=4, pid=0),
            [
                Event(FAN_PRE_ACCESS, 3, 42, FileRange(8192, 0)),
                Event(FAN_PRE_ACCESS, 4, 0, FileRange(2**63, 2**64 - 1)),
            ],
        ),
        # an overflow event: no fd, no info
        (metadata(24, FAN_Q_OVERFLOW, -1, 0), [Event(FAN_Q_OVERFLOW, -1, 0)]),
        # a pre-content event without a range (readdir of a marked directory)
        (metadata(24), [Event(FAN_PRE_ACCESS, 7, 42)]),
        # unknown info types are skipped by their len, the range is still found
        (
            metadata(24 + 8 + 24 + 12)
            + struct.pack("=BBHI", 4, 0, 8, 99)  # pidfd record
            + range_record(4096, 512)
            + struct.pack("=BBH8s", 200, 0, 12, b"future!!"),
            [Event(FAN_PRE_ACCESS, 7, 42, FileRange(4096, 512), (4, 200))],
        ),
        # metadata_len larger than 24: the info records start after it
        (
            metadata(32 + 24, metadata_len=32) + b"\0" * 8 + range_record(0, 1),
            [Event(FAN_PRE_ACCESS, 7, 42, FileRange(0, 1))],
        ),
    ],
)
def test_decode_table(raw: bytes, expected: list[Event]) -> None:
    assert wire.decode_events(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fd", "good", "why"),
    [
        (b"\x30\0\0", None, 0, "shorter than the event metadata"),
        (pre_access(0, 1) + b"\x01", None, 1, "shorter than the event metadata"),
        (metadata(48, vers=2) + range_record(0, 1), None, 0, "metadata version 2"),
        (metadata(48, metadata_len=20) + range_record(0, 1), 7, 0, "metadata_len 20"),
        (metadata(20), 7, 0, "event_len 20"),
        (metadata(49) + range_record(0, 1), 7, 0, "event_len 49"),
        (metadata(2**32 - 1), 7, 0, "event_len 4294967295"),
        (metadata(48) + range_record(0, 1, length=2), 7, 0, "has len 2"),
        (metadata(48) + range_record(0, 1, length=0), 7, 0, "has len 0"),
        (metadata(48) + range_record(0, 1, length=25), 7, 0, "has len 25"),
        (metadata(44) + range_record(0, 1, length=20)[:20], 7, 0, "range info record of 20"),
        (metadata(72) + range_record(0, 1) + range_record(0, 1), 7, 0, "two range"),
        (metadata(26) + b"\x06\0", 7, 0, "2 stray bytes"),
        # the second record is bad: the first is still reported, with its fd
        (pre_access(0, 1, fd=5) + metadata(47, fd=6), 6, 1, "event_len 47"),
        # a bad record whose fd is FAN_NOFD names no fd to answer
        (metadata(20, fd=-1), None, 0, "event_len 20"),
    ],
)
def test_malformed_records(raw: bytes, fd: int | None, good: int, why: str) -> None:
    with pytest.raises(MalformedEvent, match=why) as caught:
        wire.decode_events(raw)
    assert caught.value.fd == fd
    assert len(caught.value.events) == good
    assert isinstance(caught.value, KernelProtocolError)


def test_event_kinds() -> None:
    pre = Event(FAN_PRE_ACCESS, 3, 1, FileRange(0, 1))
    assert pre.is_permission and pre.needs_response and not pre.is_overflow
    assert not Event(FAN_PRE_ACCESS, -24, 1).needs_response  # FAN_REPORT_FD_ERROR: EMFILE
    assert not Event(FAN_ACCESS, 3, 1).is_permission
    assert Event(FAN_Q_OVERFLOW, -1, 0).is_overflow
    assert FileRange(10, 5).end == 15


# -- responses ---------------------------------------------------------------------------


def test_allow_and_plain_deny() -> None:
    assert wire.allow(5) == struct.pack("=iI", 5, 0x01)
    assert wire.deny(5) == struct.pack("=iI", 5, 0x02)
    assert wire.deny(5, errno.EPERM) == struct.pack("=iI", 5, 0x02)


@pytest.mark.parametrize("err", sorted(wire.DENY_ERRNOS - {errno.EPERM}))
def test_deny_errno_matches_the_uapi_macro(err: int) -> None:
    # FAN_DENY_ERRNO(err) = FAN_DENY | ((err & 0xff) << 24)
    assert wire.deny(9, err) == struct.pack("=iI", 9, 0x02 | err << 24)
    assert wire.decode_response(wire.deny(9, err)) == (9, wire.FAN_DENY, err)


@pytest.mark.parametrize("err", [0, errno.ENOENT, errno.EINVAL, errno.ENODATA, 256 + errno.EIO])
def test_deny_refuses_errnos_the_kernel_rejects(err: int) -> None:
    with pytest.raises(ValueError, match="FAN_DENY_ERRNO"):
        wire.deny(1, err)


def test_response_needs_an_event_fd() -> None:
    with pytest.raises(ValueError):
        wire.allow(-1)
    with pytest.raises(KernelProtocolError):
        wire.decode_response(b"\0" * 7)


# -- properties --------------------------------------------------------------------------

ranges = st.builds(FileRange, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
extra = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != 6), st.binary(max_size=40)), max_size=3
)
EventArgs = tuple[int, int, int, FileRange | None, list[tuple[int, bytes]]]
events = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.none() | ranges,
    extra,
)


@given(st.lists(events, max_size=8))
def test_round_trip(
    evs: list[tuple[int, int, int, FileRange | None, list[tuple[int, bytes]]]],
) -> None:
    raw = b"".join(wire.encode_event(*e) for e in evs)
    got = wire.decode_events(raw)
    assert got == [
        Event(mask, fd, pid, rng, kernel_order(infos)) for mask, fd, pid, rng, infos in evs
    ]


def kernel_order(infos: list[tuple[int, bytes]]) -> tuple[int, ...]:
    """File ids, pidfd and error records come before the range record, others after."""
    types = [t for t, _ in infos]
    first = [t for t in types if t in wire.INFO_BEFORE_RANGE]
    return tuple(first + [t for t in types if t not in wire.INFO_BEFORE_RANGE])


@given(st.lists(events, min_size=1, max_size=4), st.data())
def test_truncation_anywhere_is_malformed_never_a_crash(evs, data) -> None:  # type: ignore[no-untyped-def]
    raw = b"".join(wire.encode_event(*e) for e in evs)
    cut = data.draw(st.integers(1, len(raw) - 1))
    try:
        got = wire.decode_events(raw[:cut])
    except MalformedEvent as exc:
        assert len(exc.events) < len(evs)
    else:  # cut exactly between two records
        assert len(got) < len(evs)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_kernel_protocol_error(raw: bytes) -> None:
    fuzz_one_input(raw)


@given(st.lists(events, min_size=1, max_size=4), st.data())
def test_one_flipped_byte_never_crashes(evs, data) -> None:  # type: ignore[no-untyped-def]
    raw = bytearray(b"".join(wire.encode_event(*e) for e in evs))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    fuzz_one_input(bytes(raw))


def test_deny_errno_probe_layout() -> None:
    """fd FAN_NOFD, FAN_DENY | FAN_INFO | errno << 24, then the 16-byte audit-rule
    record (type 1, len 16) the kernel wants with FAN_INFO."""
    raw = wire.deny_errno_probe(errno.EAGAIN)
    assert raw == struct.pack("=iI", -1, 0x02 | 0x20 | errno.EAGAIN << 24) + struct.pack(
        "=BBHIII", 1, 0, 16, 0, 0, 0
    )
    with pytest.raises(ValueError):
        wire.deny_errno_probe(0)
    with pytest.raises(ValueError):
        wire.deny_errno_probe(256)
