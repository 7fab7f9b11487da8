"""The fanotify driver with the real engine, file source, presence store and cache file,
against a stand-in group: a SOCK_SEQPACKET socket pair (one ``read()`` is one message,
as one ``read()`` of a group returns whole events). The test writes event records whose
fds are real fds of the cache file, and reads the responses the driver writes back.
The real kernel runs the same paths in tests/vm/test_fanotify_frontend_guest.py."""

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
from cachefilesd_py.frontends.fanotify.driver import FanotifyDriver
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
        """A daemon over ``tmp``'s origin and cache (made on first use)."""
        self.origin = tmp / "origin" / "imgs"
        self.data = pattern_bytes(7, 0, SIZE)
        if not self.origin.exists():
            self.origin.mkdir(parents=True)
            (self.origin / "app.erofs").write_bytes(self.data)
        self.cache = tmp / "cache"
        self.cache.mkdir(exist_ok=True)
        self.factory = SourceFactory()
        self.engine = Engine(
            resolve=lambda _v, name: f"file://{self.origin}/{name.decode()}",
            open_source=self.factory.open,
            presence=PresenceStore(self.cache / "presence"),
            settings=EngineSettings(chunk_size=CHUNK, checkpoint_interval=3600),
        )
        self.kernel_end, group_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        group_end.setblocking(False)  # like a FAN_NONBLOCK group: EAGAIN when empty
        self.group = OwnedFd(group_end.detach())
        self.driver = FanotifyDriver(self.group, self.engine, workers=2, fetch_timeout=10)
        # the deny-errno probe the driver wrote at start
        probe = self.kernel_end.recv(64)
        assert probe == wire.deny_errno_probe(errno.EIO)
        self.served = images.prepare_blob(
            self.engine,
            self.cache,
            BlobKey.named("imgs", "app.erofs"),
            Deadline.after(10),
        )
        self.driver.session.add_image(self.served.identity, self.served, SIZE)
        self.driver.start()

    def event(self, offset: int, count: int) -> int:
        """Queue one pre-access event with a fresh fd of the cache file; its number."""
        fd = os.open(self.served.path, os.O_RDWR | os.O_CLOEXEC)
        self.kernel_end.send(
            wire.encode_event(FAN_PRE_ACCESS, fd, 4242, wire.FileRange(offset, count))
        )
        return fd

    def answer(self) -> tuple[int, int, int]:
        self.kernel_end.settimeout(20)
        return wire.decode_response(self.kernel_end.recv(64))

    def close(self) -> None:
        self.driver.stop()
        self.engine.release(self.served.blob, committed=lambda: self.served.path)
        self.engine.leases.release_use(self.served.key)
        self.engine.close()
        self.group.close()
        self.kernel_end.close()
        self.factory.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def cached(rig: Rig, offset: int, length: int) -> bytes:
    with open(rig.served.path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_missing_range_is_filled_then_allowed(rig: Rig) -> None:
    assert os.path.getsize(rig.served.path) == SIZE
    assert os.stat(rig.served.path).st_blocks == 0  # sparse, nothing yet
    fd = rig.event(CHUNK + 4096, 8192)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    assert cached(rig, CHUNK, CHUNK) == rig.data[CHUNK : 2 * CHUNK]
    assert cached(rig, 0, CHUNK) == bytes(CHUNK)  # nothing else fetched
    assert rig.engine.filler.stats.chunks_fetched == 1
    assert rig.driver.held_fds() == 0  # the event's fd was closed after its answer


def test_present_range_is_allowed_from_the_bitmap_without_a_fill(rig: Rig) -> None:
    fd = rig.event(0, 4096)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    fetched = rig.engine.filler.stats.chunks_fetched
    for _ in range(5):
        fd = rig.event(0, 4096)
        assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    assert rig.engine.filler.stats.chunks_fetched == fetched
    counts = rig.driver.session.counts()
    assert counts.allowed_present == 5 and counts.fills == 1


def test_the_last_short_chunk_and_a_read_past_the_end(rig: Rig) -> None:
    fd = rig.event(10 * CHUNK, 4096)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)
    assert cached(rig, 10 * CHUNK, 200) == rig.data[10 * CHUNK :]
    fd = rig.event(SIZE + 8192, 4096)
    assert rig.answer() == (fd, wire.FAN_ALLOW, 0)


def test_failed_fetch_is_denied_with_eio_and_nothing_marked(rig: Rig) -> None:
    with open(rig.origin / "app.erofs", "r+b") as f:  # the origin loses the blob's tail
        f.truncate(CHUNK)
    fd = rig.event(3 * CHUNK, 4096)
    assert rig.answer() == (fd, wire.FAN_DENY, errno.EIO)
    presence = rig.served.blob.presence
    assert presence is not None and not presence.is_present(3)
    assert cached(rig, 3 * CHUNK, CHUNK) == bytes(CHUNK)
    # the origin's blob changed: another version's bytes are never mixed in
    (rig.origin / "app.erofs").write_bytes(rig.data)
    fd = rig.event(3 * CHUNK, 4096)
    assert rig.answer() == (fd, wire.FAN_DENY, errno.EIO)
    assert rig.driver.session.counts().fill_failed == 2


def test_several_events_on_one_chunk_fetch_it_once(rig: Rig) -> None:
    fds = [rig.event(5 * CHUNK + i * 4096, 4096) for i in range(6)]
    answers = sorted(rig.answer() for _ in fds)
    assert answers == sorted((fd, wire.FAN_ALLOW, 0) for fd in fds)
    assert rig.engine.filler.stats.chunks_fetched == 1


def test_file_of_another_inode_is_denied(rig: Rig, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * 4096)
    fd = os.open(other, os.O_RDONLY | os.O_CLOEXEC)
    rig.kernel_end.send(wire.encode_event(FAN_PRE_ACCESS, fd, 1, wire.FileRange(0, 4096)))
    assert rig.answer() == (fd, wire.FAN_DENY, errno.EIO)


def test_restart_trusts_the_bound_sidecar(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    fd = r.event(0, 3 * CHUNK)
    assert r.answer() == (fd, wire.FAN_ALLOW, 0)
    r.close()
    r2 = Rig(tmp_path)  # a second daemon over the same cache and origin
    try:
        presence = r2.served.blob.presence
        assert presence is not None and presence.trusted and presence.bitmap.count() == 3
        fd = r2.event(CHUNK, 4096)
        assert r2.answer() == (fd, wire.FAN_ALLOW, 0)
        assert r2.engine.filler.stats.chunks_fetched == 0
    finally:
        r2.close()


def test_a_punched_present_chunk_is_distrusted_at_start(tmp_path: Path) -> None:
    """A trusted sidecar whose present chunks are holes in the file (punched behind
    the daemon's back) is cleared: the fast path would otherwise allow zeros."""
    from cachefilesd_py.kernel._sys import punch_hole

    r = Rig(tmp_path)
    fd = r.event(0, 2 * CHUNK)
    assert r.answer() == (fd, wire.FAN_ALLOW, 0)
    path = r.served.path
    r.close()
    with OwnedFd(os.open(path, os.O_RDWR)) as f:
        punch_hole(f.fileno(), CHUNK, CHUNK)
    engine = Engine(
        resolve=lambda _v, name: f"file://{r.origin}/{name.decode()}",
        open_source=SourceFactory().open,
        presence=PresenceStore(r.cache / "presence"),
        settings=EngineSettings(chunk_size=CHUNK, checkpoint_interval=3600),
    )
    served = images.prepare_blob(
        engine, r.cache, BlobKey.named("imgs", "app.erofs"), Deadline.after(10)
    )
    try:
        presence = served.blob.presence
        assert presence is not None and presence.bitmap.count() == 0
        assert os.stat(path).st_blocks == 0  # emptied: its bytes are not vouched for
    finally:
        engine.release(served.blob)
        engine.leases.release_use(served.key)
        engine.close()
