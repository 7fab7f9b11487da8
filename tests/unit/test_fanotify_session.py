"""The fanotify session (frontends/fanotify/session.py): table tests over event bytes
and random sequences checking that every permission event is answered exactly once and
never allowed over a missing range."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.frontends.fanotify import session as sess
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.kernel.fanotify import FAN_CLOSE_NOWRITE, FAN_PRE_ACCESS, FAN_Q_OVERFLOW

CHUNK = 4096


class Image:
    """A handle with a bitmap of present 4 KiB chunks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.present: set[int] = set()

    def covers(self, offset: int, length: int) -> bool:
        first, last = offset // CHUNK, -(-(offset + length) // CHUNK)
        return all(i in self.present for i in range(first, last))


def present(img: Image, offset: int, length: int) -> bool:
    return img.covers(offset, length)


def ev(fd: int, offset: int | None = 0, count: int = 4096, mask: int = FAN_PRE_ACCESS) -> bytes:
    rng = None if offset is None else wire.FileRange(offset, count)
    return wire.encode_event(mask, fd, 1234, rng)


def make(size: int = 10 * CHUNK) -> tuple[sess.Session[Image], Image]:
    s: sess.Session[Image] = sess.Session(present)
    img = Image(size)
    s.add_image("img", img, size)
    return s, img


def by_fd(fd_to_file: dict[int, str]):  # type: ignore[no-untyped-def]
    return lambda fd: fd_to_file.get(fd)


def kinds(actions: list[sess.Action[Image]]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for a in actions:
        if isinstance(a, sess.Answer):
            out.append(("answer", a.fd, a.allow, a.reason, a.err))
        elif isinstance(a, sess.Fill):
            out.append(("fill", a.fd, a.offset, a.length))
        elif isinstance(a, sess.CloseFd):
            out.append(("close", a.fd))
        else:
            out.append(("report", a.event))
    return out


@pytest.mark.parametrize(
    ("present_chunks", "raw", "files", "expected"),
    [
        # a missing range is filled, never allowed at once
        ((), ev(5, 8192, 8192), {5: "img"}, [("fill", 5, 8192, 8192)]),
        # every chunk present by the bitmap: allowed at once (the file is not asked)
        ({2, 3}, ev(5, 8192, 8192), {5: "img"}, [("answer", 5, True, sess.Reason.PRESENT, 0)]),
        # one chunk of two missing: filled
        ({2}, ev(5, 8192, 8192), {5: "img"}, [("fill", 5, 8192, 8192)]),
        # a read past the end: nothing to fill, allowed
        ((), ev(5, 40960, 4096), {5: "img"}, [("answer", 5, True, sess.Reason.PAST_END, 0)]),
        # a range reaching past the end is clipped to the image
        ((), ev(5, 36864, 8192), {5: "img"}, [("fill", 5, 36864, 4096)]),
        # not one of our files: denied with EIO, never allowed
        (
            (),
            ev(6),
            {},
            [
                ("report", "fanotify.unknown_file"),
                ("answer", 6, False, sess.Reason.UNKNOWN_FILE, errno.EIO),
            ],
        ),
        # no range record: denied
        (
            (),
            ev(5, None),
            {5: "img"},
            [
                ("report", "fanotify.no_range"),
                ("answer", 5, False, sess.Reason.NO_RANGE, errno.EIO),
            ],
        ),
        # not a permission event: only closed
        ((), ev(5, None, mask=FAN_CLOSE_NOWRITE), {5: "img"}, [("close", 5)]),
        # an overflow: reported, no fd to close
        (
            (),
            wire.encode_event(FAN_Q_OVERFLOW, wire.FAN_NOFD, 0),
            {},
            [("report", "fanotify.queue_overflow")],
        ),
        # three events in one read: each on its own
        (
            {0},
            ev(5, 0, 4096) + ev(6, 4096, 4096) + ev(7, 0, 4096),
            {5: "img", 6: "img", 7: "img"},
            [
                ("answer", 5, True, sess.Reason.PRESENT, 0),
                ("fill", 6, 4096, 4096),
                ("answer", 7, True, sess.Reason.PRESENT, 0),
            ],
        ),
        # malformed second record: the first is still handled, the bad one denied
        (
            set(),
            ev(5, 0, 4096) + ev(9, 0, 4096)[:30],
            {5: "img"},
            [
                ("fill", 5, 0, 4096),
                ("report", "fanotify.malformed_event"),
                ("answer", 9, False, sess.Reason.MALFORMED, errno.EIO),
            ],
        ),
    ],
)
def test_event_table(
    present_chunks: set[int],
    raw: bytes,
    files: dict[int, str],
    expected: list[tuple[object, ...]],
) -> None:
    s, img = make()
    img.present |= set(present_chunks)
    assert kinds(s.receive(raw, by_fd(files))) == expected


def test_fill_outcome_decides_the_answer() -> None:
    s, _img = make()
    (fill_a,) = s.receive(ev(5, 0, 4096), by_fd({5: "img"}))
    (fill_b,) = s.receive(ev(6, 0, 4096), by_fd({6: "img"}))
    assert isinstance(fill_a, sess.Fill) and isinstance(fill_b, sess.Fill)
    assert s.in_flight() == [5, 6]
    assert kinds(s.filled(fill_a.ticket, True)) == [("answer", 5, True, sess.Reason.FILLED, 0)]
    assert kinds(s.filled(fill_b.ticket, False)) == [
        ("answer", 6, False, sess.Reason.FILL_FAILED, errno.EIO)
    ]
    assert s.in_flight() == []
    with pytest.raises(KeyError):  # a second report of one fill is a bug, never an answer
        s.filled(fill_a.ticket, True)


def test_closing_image_denies_new_events_and_waits_for_fills() -> None:
    s, _img = make()
    (fill,) = s.receive(ev(5), by_fd({5: "img"}))
    assert isinstance(fill, sess.Fill)
    assert not s.close_image("img")  # a fill is in flight
    assert kinds(s.receive(ev(6), by_fd({6: "img"}))) == [
        ("answer", 6, False, sess.Reason.CLOSING, errno.EIO)
    ]
    with pytest.raises(RuntimeError):
        s.forget_image("img")
    s.filled(fill.ticket, True)
    assert s.close_image("img")
    s.forget_image("img")
    assert s.images() == []


def test_deny_errno_must_be_one_the_kernel_takes() -> None:
    with pytest.raises(ValueError):
        sess.Session(present, deny_errno=errno.ENOENT)
    s: sess.Session[Image] = sess.Session(present, deny_errno=errno.EPERM)
    assert kinds(s.receive(ev(3), by_fd({}))) == [
        ("report", "fanotify.unknown_file"),
        ("answer", 3, False, sess.Reason.UNKNOWN_FILE, errno.EPERM),
    ]


event_st = st.tuples(
    st.just(0),  # fd: numbered by position
    st.one_of(st.none(), st.integers(0, 12 * CHUNK)),  # offset (None: no range)
    st.integers(0, 3 * CHUNK),  # count
    st.sampled_from([FAN_PRE_ACCESS, FAN_PRE_ACCESS, FAN_CLOSE_NOWRITE]),
    st.booleans(),  # the fd is one of the image's
)


@settings(max_examples=100, deadline=None)
@given(
    reads=st.lists(st.lists(event_st, min_size=1, max_size=5), min_size=1, max_size=8),
    outcomes=st.lists(st.booleans(), min_size=64, max_size=64),
    present_chunks=st.sets(st.integers(0, 9)),
    truncate=st.one_of(st.none(), st.integers(1, 47)),
)
def test_every_permission_event_is_answered_once_and_never_allowed_over_a_hole(
    reads: list[list[tuple[int, int | None, int, int, bool]]],
    outcomes: list[bool],
    present_chunks: set[int],
    truncate: int | None,
) -> None:
    s, img = make()
    img.present |= present_chunks
    expected_answers: list[int] = []
    answers: list[sess.Answer] = []
    fills: list[sess.Fill[Image]] = []
    closes: list[int] = []
    for n, batch in enumerate(reads):
        raw = b""
        files: dict[int, str] = {}
        fds: list[int] = []
        for index, (_fd, offset, count, mask, ours) in enumerate(batch):
            fd = 3 + 10 * n + index  # the kernel never hands out one number twice at once
            raw += ev(fd, offset, count, mask)
            if ours:
                files[fd] = "img"
            if mask == FAN_PRE_ACCESS:
                fds.append(fd)
        if truncate is not None and n == 0:
            raw = raw[: len(raw) - truncate] if len(raw) > truncate else raw
        actions = s.receive(raw, by_fd(files))
        if truncate is not None and n == 0:
            # only events whose metadata survived are owed an answer
            fds = [a.fd for a in actions if isinstance(a, sess.Answer)] + [
                a.fd for a in actions if isinstance(a, sess.Fill)
            ]
        expected_answers += fds
        for a in actions:
            if isinstance(a, sess.Answer):
                answers.append(a)
            elif isinstance(a, sess.Fill):
                fills.append(a)
            elif isinstance(a, sess.CloseFd):
                closes.append(a.fd)
    for i, fill in enumerate(fills):
        (answer,) = s.filled(fill.ticket, outcomes[i % len(outcomes)])
        assert isinstance(answer, sess.Answer)
        answers.append(answer)
        if answer.allow:
            img.present |= set(
                range(fill.offset // CHUNK, -(-(fill.offset + fill.length) // CHUNK))
            )
    answered = sorted(a.fd for a in answers)
    assert answered == sorted(expected_answers)
    assert len(set(answered)) == len(answered)
    assert not set(answered) & set(closes)
    for a in answers:
        if a.allow:
            assert a.reason in (sess.Reason.PRESENT, sess.Reason.PAST_END, sess.Reason.FILLED)
        else:
            assert a.err == errno.EIO
    assert s.in_flight() == []
