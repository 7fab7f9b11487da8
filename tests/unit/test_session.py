"""The on-demand session, without a kernel: wire bytes in, actions out.

Tables of message sequences with the exact actions each step must produce, and random
sequences (hypothesis) checked against the protocol's promises: every OPEN gets
exactly one ``copen``, every READ of a known object exactly one completion on an fd of
that object, every adopted fd is closed exactly once and never used after its close.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.frontends.ondemand import session as sess
from cachefilesd_py.frontends.ondemand import wire

Handle = str  # the driver's handle of an opened object; a name here


def OPEN(msg_id: int, object_id: int, fd: int, cookie: bytes = b"img") -> bytes:
    return wire.encode_message(
        wire.OpenRequest(msg_id, object_id, b"erofs," + cookie, cookie, fd, 0)
    )


def READ(msg_id: int, object_id: int, offset: int = 0, length: int = 4096) -> bytes:
    return wire.encode_message(wire.ReadRequest(msg_id, object_id, offset, length))


def CLOSE(msg_id: int, object_id: int) -> bytes:
    return wire.encode_message(wire.CloseRequest(msg_id, object_id))


def render(action: sess.Action[int, Handle]) -> tuple[object, ...]:
    if isinstance(action, sess.OpenObject):
        return ("open", action.msg_id, action.object_id, str(action.key), action.fd)
    if isinstance(action, sess.Copen):
        return ("copen", action.msg_id, action.value)
    if isinstance(action, sess.ServeRead):
        return ("read", action.msg_id, action.fd, action.offset, action.fill)
    if isinstance(action, sess.CloseFd):
        return ("close_fd", action.fd)
    if isinstance(action, sess.Release):
        return ("release", action.handle, action.why.value)
    assert isinstance(action, sess.Report)
    return ("report", action.event)


class Driver:
    """Runs a session the way the driver does, by steps: messages in, and reports of
    finished work by the msg_id of the OPEN or READ it belongs to."""

    def __init__(self) -> None:
        self.session: sess.Session[int, Handle] = sess.Session()
        self.tickets: dict[int, int] = {}  # msg_id -> ticket of its pending work
        self.bad_fds: set[int] = set()

    def adopt(self, fd: int) -> int:
        if fd in self.bad_fds:
            raise OSError(errno.EBADF, "not open")
        return fd

    def out(self, actions: list[sess.Action[int, Handle]]) -> list[tuple[object, ...]]:
        for a in actions:
            if isinstance(a, sess.OpenObject | sess.ServeRead | sess.Copen):
                self.tickets[a.msg_id] = a.ticket
        return [render(a) for a in actions]

    def step(self, kind: str, *args: object) -> list[tuple[object, ...]]:
        s = self.session
        if kind == "msg":
            return self.out(s.receive(args[0], self.adopt))  # type: ignore[arg-type]
        msg_id = args[0]
        ticket = self.tickets[msg_id]  # type: ignore[index]
        if kind == "opened":
            size = args[1]
            handle = f"h{msg_id}" if size >= 0 else None  # type: ignore[operator]
            return self.out(s.opened(ticket, handle, size))  # type: ignore[arg-type]
        if kind == "copen_failed":
            return self.out(s.copen_failed(ticket))
        if kind == "served":
            return self.out(s.served(ticket))
        raise AssertionError(kind)


TABLE: dict[str, list[tuple[tuple[object, ...], list[tuple[object, ...]]]]] = {
    "open, read, close": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (("msg", READ(2, 5, 4096)), [("read", 2, 10, 4096, True)]),
        (("served", 2), []),
        (
            ("msg", CLOSE(3, 5)),
            [("report", "close"), ("close_fd", 10), ("release", "h1", "closed")],
        ),
    ],
    "a refused OPEN: copen with the errno, its fd closed, nothing to release": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, -errno.ENOENT), [("copen", 1, -errno.ENOENT), ("close_fd", 10)]),
        (("msg", READ(2, 5)), [("report", "read.unknown_object")]),
    ],
    "an fd that cannot be adopted": [
        (("msg", OPEN(1, 5, 666)), [("report", "open.bad_fd"), ("copen", 1, -errno.EBADF)]),
    ],
    "a READ or CLOSE for an unknown object, and garbage": [
        (("msg", READ(1, 9)), [("report", "read.unknown_object")]),
        (("msg", CLOSE(2, 9)), [("report", "close.unknown_object")]),
        (("msg", b"\x01\x00\x00\x00garbage"), [("report", "kernel.malformed_message")]),
        (("msg", b""), [("report", "kernel.malformed_message")]),
    ],
    "a CLOSE while a READ is served: the fd stays open until it is completed": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (("msg", READ(2, 5)), [("read", 2, 10, 0, True)]),
        (("msg", CLOSE(3, 5)), [("report", "close")]),
        (("served", 2), [("close_fd", 10), ("release", "h1", "closed")]),
    ],
    "an object id reused without a CLOSE: the old object is released uncommitted": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (
            ("msg", OPEN(2, 5, 11, b"new")),
            [
                ("report", "open.stale_object"),
                ("close_fd", 10),
                ("release", "h1", "replaced"),
                ("open", 2, 5, "erofs,new/new", 11),
            ],
        ),
        (("opened", 2, 4096), [("copen", 2, 4096)]),
        (("msg", READ(3, 5)), [("read", 3, 11, 0, True)]),
    ],
    "an id reused while a READ of the old object is served": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (("msg", READ(2, 5)), [("read", 2, 10, 0, True)]),
        (
            ("msg", OPEN(3, 5, 11)),
            [("report", "open.stale_object"), ("open", 3, 5, "erofs,img/img", 11)],
        ),
        (("served", 2), [("close_fd", 10), ("release", "h1", "replaced")]),
    ],
    "a READ before the copen waits for it": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("msg", READ(2, 5, 8192)), []),
        (("opened", 1, 65536), [("copen", 1, 65536), ("read", 2, 10, 8192, True)]),
    ],
    "a READ waiting for a refused OPEN is completed without data": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("msg", READ(2, 5)), []),
        (("opened", 1, -errno.EIO), [("copen", 1, -errno.EIO), ("read", 2, 10, 0, False)]),
        (("served", 2), [("close_fd", 10)]),
    ],
    "a copen that cannot be written: the kernel never opened the object": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (("copen_failed", 1), [("close_fd", 10), ("release", "h1", "copen_failed")]),
    ],
    "after restore: a re-sent OPEN under a new id for a blob already held, then READs "
    "with msg ids never seen": [
        (("msg", OPEN(1, 5, 10)), [("open", 1, 5, "erofs,img/img", 10)]),
        (("opened", 1, 8192), [("copen", 1, 8192)]),
        (("msg", OPEN(700, 6, 11)), [("open", 700, 6, "erofs,img/img", 11)]),
        (("opened", 700, 8192), [("copen", 700, 8192)]),
        (("msg", READ(701, 6, 4096)), [("read", 701, 11, 4096, True)]),
        (("msg", READ(2, 5)), [("read", 2, 10, 0, True)]),
        (("msg", READ(701, 6, 4096)), [("read", 701, 11, 4096, True)]),  # re-delivered
    ],
    "after restore: a re-sent OPEN for a blob never seen": [
        (("msg", OPEN(9000, 3, 12, b"other")), [("open", 9000, 3, "erofs,other/other", 12)]),
        (("opened", 9000, 4096), [("copen", 9000, 4096)]),
        (("msg", READ(9001, 3)), [("read", 9001, 12, 0, True)]),
    ],
}


@pytest.mark.parametrize("name", list(TABLE))
def test_table(name: str) -> None:
    d = Driver()
    d.bad_fds = {666}
    for step, expected in TABLE[name]:
        assert d.step(*step) == expected, (name, step)


def test_close_all_closes_every_fd_once() -> None:
    d = Driver()
    d.step("msg", OPEN(1, 5, 10))
    d.step("opened", 1, 4096)
    d.step("msg", OPEN(2, 6, 11))  # still opening
    d.step("msg", OPEN(3, 7, 12))
    d.step("opened", 3, 4096)
    d.step("msg", READ(4, 7))  # being served
    d.step("msg", CLOSE(5, 7))
    closed = sorted(render(a) for a in d.session.close_all())
    assert closed == [("close_fd", 10), ("close_fd", 11), ("close_fd", 12)]
    assert d.session.close_all() == []
    assert len(d.session) == 0


def test_counts() -> None:
    d = Driver()
    d.step("msg", OPEN(1, 5, 10))
    d.step("msg", OPEN(2, 5, 11))
    d.step("msg", READ(3, 8))
    d.step("msg", CLOSE(4, 8))
    d.step("msg", b"junk")
    c = d.session.counts()
    assert (c.opens, c.reads, c.closes, c.malformed) == (2, 1, 1, 1)
    assert (c.replaced, c.unknown_reads, c.unknown_closes) == (1, 1, 1)


# -- random sequences -------------------------------------------------------------------

OBJECT_IDS = st.integers(1, 4)  # few ids: reuse is frequent
steps = st.lists(
    st.one_of(
        st.tuples(st.just("open"), OBJECT_IDS, st.sampled_from([b"a", b"b"])),
        st.tuples(st.just("read"), OBJECT_IDS),
        st.tuples(st.just("close"), OBJECT_IDS),
        st.tuples(st.just("garbage")),
        st.tuples(st.just("finish_open"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("copen_fails"), st.integers(0, 50)),
        st.tuples(st.just("finish_read"), st.integers(0, 50)),
    ),
    max_size=60,
)


@dataclass
class Ledger:
    """What the actions promised, checked as they come."""

    copens: dict[int, int] = field(default_factory=dict)  # OPEN msg_id -> copens
    fds_of_object: dict[int, set[int]] = field(default_factory=dict)
    closed_fds: dict[int, int] = field(default_factory=dict)
    completions: dict[int, list[int]] = field(default_factory=dict)  # READ msg -> fds
    unknown_reads: set[int] = field(default_factory=set)
    released: dict[str, int] = field(default_factory=dict)
    open_fds: set[int] = field(default_factory=set)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_random_sequences_keep_the_promises(plan: list[tuple[object, ...]]) -> None:
    s: sess.Session[int, Handle] = sess.Session()
    ledger = Ledger()
    pending_opens: list[sess.OpenObject[int]] = []
    pending_copens: list[sess.Copen] = []
    pending_reads: list[sess.ServeRead[int, Handle]] = []
    read_objects: dict[int, int] = {}  # READ msg_id -> object id asked
    open_objects: dict[int, int] = {}  # OPEN msg_id -> object id
    msg_ids = iter(range(1, 10_000))
    fds = iter(range(100, 10_000))

    def run(actions: list[sess.Action[int, Handle]]) -> None:
        for a in actions:
            if isinstance(a, sess.OpenObject):
                pending_opens.append(a)
                ledger.fds_of_object.setdefault(a.object_id, set()).add(a.fd)
                ledger.open_fds.add(a.fd)
            elif isinstance(a, sess.Copen):
                ledger.copens[a.msg_id] = ledger.copens.get(a.msg_id, 0) + 1
                if a.value >= 0:
                    pending_copens.append(a)
            elif isinstance(a, sess.ServeRead):
                assert a.fd in ledger.open_fds, "a READ served on a closed fd"
                assert a.fd in ledger.fds_of_object[read_objects[a.msg_id]], "fd of another object"
                pending_reads.append(a)
            elif isinstance(a, sess.CloseFd):
                assert a.fd in ledger.open_fds, "fd closed twice"
                assert not any(r.fd == a.fd for r in pending_reads), "fd closed under a READ"
                ledger.open_fds.discard(a.fd)
                ledger.closed_fds[a.fd] = ledger.closed_fds.get(a.fd, 0) + 1
            elif isinstance(a, sess.Release):
                ledger.released[a.handle] = ledger.released.get(a.handle, 0) + 1
            elif a.event == "read.unknown_object":
                ledger.unknown_reads.add(dict(a.fields)["msg_id"])  # type: ignore[arg-type]

    def complete(r: sess.ServeRead[int, Handle]) -> None:
        pending_reads.remove(r)
        ledger.completions.setdefault(r.msg_id, []).append(r.fd)
        run(s.served(r.ticket))

    for step in plan:
        kind = step[0]
        if kind == "open":
            m = next(msg_ids)
            open_objects[m] = step[1]  # type: ignore[assignment]
            run(s.receive(OPEN(m, step[1], next(fds), step[2]), lambda fd: fd))  # type: ignore[arg-type]
        elif kind == "read":
            m = next(msg_ids)
            read_objects[m] = step[1]  # type: ignore[assignment]
            run(s.receive(READ(m, step[1]), lambda fd: fd))  # type: ignore[arg-type]
        elif kind == "close":
            run(s.receive(CLOSE(next(msg_ids), step[1]), lambda fd: fd))  # type: ignore[arg-type]
        elif kind == "garbage":
            run(s.receive(b"\xff" * 7, lambda fd: fd))
        elif kind == "finish_open" and pending_opens:
            o = pending_opens.pop(step[1] % len(pending_opens))  # type: ignore[operator]
            ok = step[2]
            run(s.opened(o.ticket, f"h{o.msg_id}" if ok else None, 4096 if ok else -errno.EIO))
        elif kind == "copen_fails" and pending_copens:
            c = pending_copens.pop(step[1] % len(pending_copens))  # type: ignore[operator]
            run(s.copen_failed(c.ticket))
        elif kind == "finish_read" and pending_reads:
            complete(pending_reads[step[1] % len(pending_reads)])  # type: ignore[operator]
    # the driver finishes everything it was given, then shuts down
    while pending_opens or pending_reads:
        while pending_opens:
            o = pending_opens.pop()
            run(s.opened(o.ticket, f"h{o.msg_id}", 4096))
        while pending_reads:
            complete(pending_reads[0])
    for c in pending_copens:
        s.copen_written(c.ticket)
    run(s.close_all())

    assert sorted(ledger.copens) == sorted(open_objects), "an OPEN without a copen"
    assert set(ledger.copens.values()) <= {1}, "an OPEN with two copens"
    for m in read_objects:
        served = ledger.completions.get(m, [])
        assert (len(served), m in ledger.unknown_reads) in ((1, False), (0, True)), m
    adopted = set().union(*ledger.fds_of_object.values()) if ledger.fds_of_object else set()
    assert set(ledger.closed_fds) == adopted and set(ledger.closed_fds.values()) <= {1}
    assert not ledger.open_fds
    assert set(ledger.released.values()) <= {1}, "a blob released twice"
    assert len(s) == 0
