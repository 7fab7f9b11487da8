"""Conflicts (issue 14 item 4) through the on-demand driver: the fake kernel, the
fault HTTP server whose blob is replaced "upstream", and the real conflict book.

- the resync after a reconnect finds an open blob that changed upstream; its reader
  gets the cached bytes or EIO, never bytes of the new version;
- a fetch the origin's validators refuse records a conflict too;
- the OPEN of a pinned blob whose cache file holds another version keeps the cached
  version in force (``copen`` with the cached size) until resolved;
- ``resolve keep`` keeps it across OPENs; ``resolve refetch`` takes the origin's
  version at the next OPEN; both survive a restart of the book (``conflicts.json``).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.engine.conflicts import UNKNOWN, Conflict, ConflictBook, Resolution
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.connectivity import ScriptedConnectivity
from cachefilesd_py.testing.fake_kernel import FakeCachefiles, FakeObjectHandle
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

SIZE = 512 * 1024
NEW_SIZE = 640 * 1024
CHUNK = 64 * 1024
PATIENCE = 20.0
OLD = pattern_bytes(1, 0, SIZE)
NEW = pattern_bytes(2, 0, NEW_SIZE)
KEY = BlobKey(b"erofs,img", b"b")


@dataclass
class Stack:
    fake: FakeCachefiles
    driver: OnDemandDriver
    engine: Engine
    server: FaultServer
    net: ScriptedConnectivity
    found: list[Conflict]
    pinned: set[BlobKey]
    stop: threading.Event
    thread: threading.Thread

    def open(self) -> FakeObjectHandle:
        return self.fake.lookup(KEY.volume_key, KEY.name, PATIENCE)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with FaultServer({"b": OLD}) as server:
        fake = FakeCachefiles()
        found: list[Conflict] = []
        pinned: set[BlobKey] = set()
        engine = Engine(
            resolve=SourceResolver([SourceRule("img/*", server.url + "/{cookie}")]).resolve,
            open_source=SourceFactory(SourceSettings(retries=0, timeout=5.0)).open,
            presence=PresenceStore(tmp_path / "state" / "presence"),
            settings=EngineSettings(chunk_size=CHUNK, fetch_timeout=5.0, buffers=8),
            conflicts=ConflictBook(tmp_path / "state", on_found=found.append),
        )
        engine.gate.is_pinned = lambda key: key in pinned
        net = ScriptedConnectivity([server.url])
        engine.gate.connectivity = net
        engine.gate.tracked = frozenset({server.url})
        cache = tmp_path / "cache"
        cache.mkdir()
        driver = OnDemandDriver(fake, engine, cache, workers=2, fetch_timeout=5.0)
        driver.bind([b"dir " + str(cache).encode()])
        stop = threading.Event()
        thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
        thread.start()
        st = Stack(fake, driver, engine, server, net, found, pinned, stop, thread)
        try:
            yield st
        finally:
            stop.set()
            thread.join(30)
            driver.shutdown()
            fake.close()


def cached_half(st: Stack) -> FakeObjectHandle:
    """Open the blob and read its first half from the old version."""
    obj = st.open()
    assert obj.size == SIZE
    assert obj.read(0, SIZE // 2, PATIENCE) == OLD[: SIZE // 2]
    return obj


def gets(server: FaultServer) -> int:
    return sum(1 for r in server.requests if r[0] == "GET")


def test_resync_after_reconnect_finds_the_open_blob_changed_and_never_mixes(
    stack: Stack,
) -> None:
    obj = cached_half(stack)
    stack.net.link(stack.server.url, up=False)
    stack.server.replace("b", NEW)
    stack.net.link(stack.server.url, up=True)
    found = stack.engine.resync(stack.server.url)
    assert [c.blob for c in found] == [str(KEY)] and found == stack.found
    c = found[0]
    assert c.cached.startswith(f"{SIZE}:") and c.upstream.startswith(f"{NEW_SIZE}:")
    assert c.resolution is Resolution.OPEN
    assert stack.engine.conflicts.needing_attention() == 1
    # the cached half is still served, the missing half fails: never the new bytes
    assert obj.read(0, SIZE // 2, PATIENCE) == OLD[: SIZE // 2]
    with pytest.raises(OSError) as err:
        obj.read(SIZE // 2, CHUNK, PATIENCE)
    assert err.value.errno == errno.EIO
    # a second resync finds nothing new; nor does the refused fetch above
    assert stack.engine.resync(stack.server.url) == []
    assert len(stack.found) == 1


def test_a_fetch_refused_by_the_validators_records_a_conflict(stack: Stack) -> None:
    obj = cached_half(stack)
    stack.server.replace("b", NEW)
    with pytest.raises(OSError):
        obj.read(SIZE // 2, CHUNK, PATIENCE)
    [c] = stack.engine.conflicts.all()
    assert c.blob == str(KEY) and c.upstream == UNKNOWN
    # the resync learns which version the origin serves now, without a second signal
    assert stack.engine.resync(stack.server.url) == []
    [c] = stack.engine.conflicts.all()
    assert c.upstream.startswith(f"{NEW_SIZE}:")
    assert len(stack.found) == 1


def test_pinned_blob_keeps_its_cached_version_until_resolved(
    stack: Stack, tmp_path: Path
) -> None:
    obj = cached_half(stack)
    obj.withdraw(PATIENCE)  # the cache file is committed and its sidecar bound
    stack.pinned.add(KEY)
    stack.server.replace("b", NEW)

    obj = stack.open()  # the pinned copy is not silently replaced
    assert obj.size == SIZE
    [c] = stack.found
    assert c.blob == str(KEY) and c.upstream.startswith(f"{NEW_SIZE}:")
    before = gets(stack.server)
    assert obj.read(0, SIZE // 2, PATIENCE) == OLD[: SIZE // 2]
    with pytest.raises(OSError):
        obj.read(SIZE // 2, CHUNK, PATIENCE)
    assert gets(stack.server) == before, "a fetch of the kept version reached the origin"
    obj.withdraw(PATIENCE)

    # keep: the cached version on, across OPENs and a reload of the book
    assert stack.engine.conflicts.resolve(str(KEY), Resolution.KEEP).resolution.value == "keep"
    assert stack.engine.conflicts.needing_attention() == 0
    again = ConflictBook(tmp_path / "state")
    assert again.get(str(KEY)) == stack.engine.conflicts.get(str(KEY))
    obj = stack.open()
    assert obj.size == SIZE and obj.read(0, CHUNK, PATIENCE) == OLD[:CHUNK]
    assert len(stack.found) == 1, "a kept conflict was reported again"
    obj.withdraw(PATIENCE)

    # refetch: the next OPEN takes the origin's version, and the conflict ends
    stack.engine.conflicts.resolve(str(KEY), Resolution.REFETCH)
    obj = stack.open()
    assert obj.size == NEW_SIZE
    assert obj.read(0, NEW_SIZE, PATIENCE) == NEW
    assert stack.engine.conflicts.all() == []
    assert ConflictBook(tmp_path / "state").all() == []


def test_unpinned_idle_blob_takes_the_new_version_without_a_conflict(stack: Stack) -> None:
    obj = cached_half(stack)
    obj.withdraw(PATIENCE)
    stack.server.replace("b", NEW)
    obj = stack.open()
    assert obj.size == NEW_SIZE and obj.read(0, NEW_SIZE, PATIENCE) == NEW
    assert stack.engine.conflicts.all() == [] and stack.found == []


def test_resync_checks_idle_pinned_blobs_by_their_sidecar(stack: Stack) -> None:
    obj = cached_half(stack)
    obj.withdraw(PATIENCE)
    stack.server.replace("b", NEW)
    path = KEY.cache_path(stack.driver.cache_dir)
    deadline = time.monotonic() + PATIENCE  # the release binds the sidecar after CLOSE
    while stack.engine.presence.load_bound(KEY, path) is None:
        assert time.monotonic() < deadline, "the sidecar was never bound"
        time.sleep(0.02)
    [c] = stack.engine.resync(stack.server.url, [(KEY, path)])
    assert c.cached.startswith(f"{SIZE}:") and c.upstream.startswith(f"{NEW_SIZE}:")


def test_pinned_blob_opens_offline_from_its_cache_file(stack: Stack) -> None:
    """Offline, a pinned blob's OPEN is answered from the version its sidecar vouches
    for (the mount works: metadata never waits for the network); an unpinned one's
    OPEN fails at once. Back online, a missing chunk is fetched only if the origin
    still serves that version."""
    obj = cached_half(stack)
    obj.withdraw(PATIENCE)
    stack.net.link(stack.server.url, up=False)
    requests = len(stack.server.requests)
    with pytest.raises(OSError):  # not pinned: the OPEN needs the origin
        stack.open()
    stack.pinned.add(KEY)
    obj = stack.open()
    assert obj.size == SIZE and obj.read(0, SIZE // 2, PATIENCE) == OLD[: SIZE // 2]
    with pytest.raises(OSError):  # missing, offline, pinned: at once
        obj.read(SIZE // 2, CHUNK, PATIENCE)
    assert len(stack.server.requests) == requests, "an offline origin was asked"
    stack.net.link(stack.server.url, up=True)
    assert obj.read(SIZE // 2, SIZE // 2, PATIENCE) == OLD[SIZE // 2 :]
    assert stack.found == []


def test_pinned_blob_opened_offline_never_mixes_with_a_changed_origin(stack: Stack) -> None:
    obj = cached_half(stack)
    obj.withdraw(PATIENCE)
    stack.pinned.add(KEY)
    stack.net.link(stack.server.url, up=False)
    obj = stack.open()
    stack.server.replace("b", NEW)
    stack.net.link(stack.server.url, up=True)
    with pytest.raises(OSError) as err:
        obj.read(SIZE // 2, CHUNK, PATIENCE)
    assert err.value.errno == errno.EIO
    assert obj.read(0, SIZE // 2, PATIENCE) == OLD[: SIZE // 2]
    [c] = stack.engine.conflicts.all()
    assert c.cached.startswith(f"{SIZE}:") and c.resolution is Resolution.OPEN
