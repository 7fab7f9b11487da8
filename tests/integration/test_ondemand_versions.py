# ruff: noqa: F811 (the fixtures cache and daemons come from test_ondemand_fake)
"""Versions through the whole on-demand stack (fake kernel, real sidecars): an origin
with only Last-Modified that rewrites a blob in place at the same size never yields a
cache file mixing the two versions, a restart does not trust the old chunks, and an
OPEN after an upstream change learns the new identity at once (issue 10 items 1, 12)."""

from __future__ import annotations

import errno
from pathlib import Path

from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.integration.test_ondemand_fake import (  # noqa: F401 (fixtures)
    CHUNK,
    Daemon,
    cache,
    daemons,
    start,
)

SIZE = 8 * CHUNK + 1000
A = pattern_bytes(21, 0, SIZE)
B = pattern_bytes(22, 0, SIZE)


def read_or_eio(obj, off: int, n: int) -> bytes | None:  # type: ignore[no-untyped-def]
    try:
        return obj.read(off, n)  # type: ignore[no-any-return]
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        return None


def test_in_place_rewrite_with_only_last_modified(cache: Path, daemons: list[Daemon]) -> None:
    with FaultServer({"img": A}, validators="last-modified") as srv:
        d = start(daemons, cache, srv.url + "/{cookie}")
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, CHUNK) == A[:CHUNK]
        srv.replace("img", B)  # same size, a later Last-Modified, no ETag at all
        for off in range(CHUNK, SIZE, CHUNK):
            got = read_or_eio(obj, off, min(CHUNK, SIZE - off))
            assert got is None or got == A[off : off + len(got)], "version B mixed into A"
        assert d.driver.stats.reads_failed > 0
        obj.withdraw()
        d.shutdown()

        # a restart against the changed origin: the identity token differs, the chunk
        # of version A in the cache file is not trusted
        d2 = start(daemons, cache, srv.url + "/{cookie}")
        obj2 = d2.fake.lookup(b"erofs,img", b"img")
        assert obj2.read(0, SIZE) == B, "bytes of version A were served after the restart"
        obj2.withdraw()


def test_an_open_after_an_upstream_change_learns_the_new_size(
    cache: Path, daemons: list[Daemon]
) -> None:
    with FaultServer({"img": A}) as srv:
        d = start(daemons, cache, srv.url + "/{cookie}")
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.size == SIZE
        assert obj.read(0, 4096) == A[:4096]
        obj.withdraw()
        bigger = B + b"more bytes"
        srv.replace("img", bigger, '"v2"')
        obj2 = d.fake.lookup(b"erofs,img", b"img")
        assert obj2.size == len(bigger), "the OPEN got the size of the old version"
        assert obj2.read(0, len(bigger)) == bigger
        obj2.withdraw()


def test_an_open_racing_the_previous_objects_release_learns_the_new_size(
    cache: Path, daemons: list[Daemon]
) -> None:
    """The kernel sends CLOSE, then (a new mount) OPEN of the same key; the CLOSE's
    release runs in the finish lane and may not have run when the OPEN is served. The
    OPEN must not share the closed object's blob (its identity pinned to the old
    version): it waits for the release. Here the release is held back on purpose; a
    loaded machine did the same once (the OPEN got the old size)."""
    import threading

    with FaultServer({"img": A}) as srv:
        d = start(daemons, cache, srv.url + "/{cookie}")
        hold = threading.Event()
        release = d.driver._release

        def slow_release(action):  # type: ignore[no-untyped-def]
            hold.wait(5)
            release(action)

        d.driver._release = slow_release  # type: ignore[method-assign]
        obj = d.fake.lookup(b"erofs,img", b"img")
        assert obj.read(0, 4096) == A[:4096]
        obj.withdraw()
        bigger = B + b"more bytes"
        srv.replace("img", bigger, '"v2"')
        threading.Timer(1.0, hold.set).start()
        obj2 = d.fake.lookup(b"erofs,img", b"img", 30)
        assert obj2.size == len(bigger), "the OPEN shared the closed object's blob"
        assert obj2.read(0, len(bigger)) == bigger
        obj2.withdraw()
