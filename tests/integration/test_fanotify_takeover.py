"""A successor answers what a dead worker read: the in-flight journal and the takeover,
with the real engine, file source and cache file, against a stand-in group (a
SOCK_SEQPACKET pair, as in test_fanotify_driver.py). The "dead worker" reads events
into the journal and never answers them; a second journal attached to the same memfd
(as a forked successor attaches) finds them, and ``answer_orphans`` fills each range
through a silent fd and allows it. The real kernel: test_fanotify_failover_guest.py."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.fanotify import images, wire
from cachefilesd_py.frontends.fanotify.inflight import InflightJournal
from cachefilesd_py.frontends.fanotify.takeover import answer_orphans
from cachefilesd_py.kernel.fanotify import FAN_PRE_ACCESS
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.testing.pattern import pattern_bytes

CHUNK = 64 * 1024
SIZE = 10 * CHUNK + 123


class Rig:
    def __init__(self, tmp: Path) -> None:
        origin = tmp / "origin" / "imgs"
        origin.mkdir(parents=True)
        self.data = pattern_bytes(3, 0, SIZE)
        (origin / "app.erofs").write_bytes(self.data)
        cache = tmp / "cache"
        cache.mkdir()
        self.factory = SourceFactory()
        self.engine = Engine(
            resolve=lambda _v, name: f"file://{origin}/{name.decode()}",
            open_source=self.factory.open,
            presence=PresenceStore(cache / "presence"),
            settings=EngineSettings(chunk_size=CHUNK, checkpoint_interval=3600),
        )
        self.kernel_end, group_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        group_end.setblocking(False)
        self.group = OwnedFd(group_end.detach())
        self.served = images.prepare_blob(
            self.engine, cache, BlobKey.named("imgs", "app.erofs"), Deadline.after(10)
        )
        self.silent = os.open(self.served.path, os.O_RDWR | os.O_CLOEXEC)
        self.journal = InflightJournal.create(nslots=4)

    def send(self, *events: tuple[int, int, int]) -> None:
        """One read()'s worth of pre-access events (fd, offset, count)."""
        self.kernel_end.send(
            b"".join(
                wire.encode_event(FAN_PRE_ACCESS, fd, 77, wire.FileRange(off, n))
                for fd, off, n in events
            )
        )

    def responses(self) -> list[tuple[int, int, int]]:
        self.kernel_end.settimeout(0.5)
        got = []
        try:
            while True:
                got.append(wire.decode_response(self.kernel_end.recv(64)))
        except TimeoutError:
            return got

    def cached(self, offset: int, length: int) -> bytes:
        with open(self.served.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def close(self) -> None:
        self.engine.release(self.served.blob, committed=lambda: self.served.path)
        self.engine.leases.release_use(self.served.key)
        self.engine.close()
        self.journal.close()
        self.journal.fd.close()
        os.close(self.silent)
        self.group.close()
        self.kernel_end.close()
        self.factory.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_events_read_and_not_answered_are_orphans_of_the_successor(rig: Rig) -> None:
    a = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
    b = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
    c = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
    rig.send((a, 0, 4096), (b, 3 * CHUNK, 8192), (c, 7 * CHUNK, CHUNK))
    got = rig.journal.read(rig.group.fileno())
    assert got is not None and got[1]
    rig.journal.done(a)  # the dead worker answered this one before it died
    for fd in (a, b, c):  # ... and then every fd closed with it
        os.close(fd)
    successor = InflightJournal.attach(rig.journal.fd)
    try:
        orphans = successor.orphans()
        assert [(o.fd, o.range) for o in orphans] == [
            (b, wire.FileRange(3 * CHUNK, 8192)),
            (c, wire.FileRange(7 * CHUNK, CHUNK)),
        ]
        assert all(o.identity == rig.served.identity for o in orphans)
        report = answer_orphans(
            rig.group.fileno(), rig.engine, orphans, [rig.served],
            {rig.served.identity: rig.silent}, deny_errno=errno.EIO, fetch_timeout=10,
        )
        assert (report.allowed, report.denied) == (2, 0)
        assert sorted(rig.responses()) == sorted([(b, wire.FAN_ALLOW, 0), (c, wire.FAN_ALLOW, 0)])
        # allowed only after the bytes were there
        assert rig.cached(3 * CHUNK, CHUNK) == rig.data[3 * CHUNK : 4 * CHUNK]
        assert rig.cached(7 * CHUNK, CHUNK) == rig.data[7 * CHUNK : 8 * CHUNK]
        assert rig.cached(0, 4096) == bytes(4096)  # the answered one was not refetched
        successor.clear()
        assert successor.orphans() == []
    finally:
        successor.close()


def test_an_orphan_whose_file_was_never_noted_is_served_for_every_candidate(rig: Rig) -> None:
    """Killed between read() and fstat: the event's fd number is stale (fstat fails
    here because it is already closed), so every served file the range falls into is
    filled before the allow."""
    fd = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)  # the number names nothing now: identify fails
    rig.send((fd, 5 * CHUNK, 4096))
    assert rig.journal.read(rig.group.fileno()) is not None
    orphans = InflightJournal.attach(rig.journal.fd).orphans()
    assert len(orphans) == 1 and orphans[0].identity is None
    report = answer_orphans(
        rig.group.fileno(), rig.engine, orphans, [rig.served],
        {rig.served.identity: rig.silent}, deny_errno=errno.EIO, fetch_timeout=10,
    )
    assert report.allowed == 1 and report.unidentified == 1
    assert rig.responses() == [(fd, wire.FAN_ALLOW, 0)]
    assert rig.cached(5 * CHUNK, CHUNK) == rig.data[5 * CHUNK : 6 * CHUNK]


def test_an_orphan_whose_fill_fails_is_denied_never_allowed(rig: Rig, tmp_path: Path) -> None:
    fd = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
    rig.send((fd, 2 * CHUNK, 4096))
    assert rig.journal.read(rig.group.fileno()) is not None
    os.close(fd)
    orphans = InflightJournal.attach(rig.journal.fd).orphans()
    report = answer_orphans(  # no silent fd for the file: it cannot be filled
        rig.group.fileno(), rig.engine, orphans, [rig.served], {},
        deny_errno=errno.EIO, fetch_timeout=10,
    )
    assert (report.allowed, report.denied) == (0, 1)
    assert rig.responses() == [(fd, wire.FAN_DENY, errno.EIO)]


def test_slots_are_reused_once_every_event_is_done(rig: Rig) -> None:
    fds = []
    for i in range(12):  # three times the journal's four slots
        fd = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
        rig.send((fd, i * 4096, 4096))
        assert rig.journal.read(rig.group.fileno()) is not None
        rig.journal.done(fd)
        fds.append(fd)
    for fd in fds:
        os.close(fd)
    held = []
    for _ in range(4):
        fd = os.open(rig.served.path, os.O_RDONLY | os.O_CLOEXEC)
        rig.send((fd, 0, 4096))
        assert rig.journal.read(rig.group.fileno()) is not None
        held.append(fd)
    assert not rig.journal.has_room() and rig.journal.read(rig.group.fileno()) is None
    assert [o.fd for o in InflightJournal.attach(rig.journal.fd).orphans()] == held
    for fd in held:
        os.close(fd)
