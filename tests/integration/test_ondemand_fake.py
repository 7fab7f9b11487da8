"""The on-demand driver and engine end to end against the fake kernel, with real
sparse files, real sources (files, a loopback HTTP server with faults) and real
presence sidecars."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.space.plan import Outcome
from cachefilesd_py.testing.fake_kernel import FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

CHUNK = 64 * 1024
SIZE = 1_000_000 + 123
DATA = pattern_bytes(9, 0, SIZE)


class Daemon:
    """The daemon's on-demand stack on a fake device, served by a thread."""

    def __init__(
        self,
        cache: Path,
        url_template: str,
        readahead: int = 0,
        chunk: int = CHUNK,
        resolve: Callable[[bytes, bytes], str | None] | None = None,
    ) -> None:
        self.fake = FakeCachefiles()
        self.engine = Engine(
            resolve=resolve or SourceResolver([SourceRule("*", url_template)]).resolve,
            open_source=SourceFactory(SourceSettings(retries=2, timeout=2)).open,
            presence=PresenceStore(cache / "cachefilesd-py" / "presence"),
            settings=EngineSettings(
                chunk_size=chunk,
                readahead=readahead,
                fetch_timeout=3,
                checkpoint_interval=0.2,
                buffers=6,
            ),
        )
        self.driver = OnDemandDriver(self.fake, self.engine, cache, workers=4, fetch_timeout=3)
        self.driver.bind([b"dir " + str(cache).encode(), b"tag t"])
        self.engine.start()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.driver.serve, args=(self.stop, 0.05))
        self.thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.driver.shutdown()
        self.fake.close()


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    d = tmp_path / "blobs"
    d.mkdir()
    (d / "img").write_bytes(DATA)
    return d


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    c.mkdir()
    return c


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        if not d.stop.is_set():
            d.shutdown()


def start(daemons: list[Daemon], cache: Path, url: str, **kw: Any) -> Daemon:
    d = Daemon(cache, url, **kw)
    daemons.append(d)
    return d


def test_serves_every_byte(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj = d.fake.lookup(b"erofs,img", b"img")
    assert obj.size == SIZE
    for off in (0, 4096, 500_000, SIZE - 5000):
        assert obj.read(off, 70_000) == DATA[off : off + 70_000]
    got = b"".join(obj.read(o, 100_000) for o in range(0, SIZE, 100_000))
    assert got == DATA


def test_missing_blob_refuses_open(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    with pytest.raises(OSError) as e:
        d.fake.lookup(b"erofs,absent", b"absent")
    assert e.value.errno == errno.ENOENT
    assert d.fake.lookup(b"erofs,img", b"img").read(0, 10) == DATA[:10]


def test_concurrent_readers_fetch_each_chunk_once(cache: Path, daemons: list[Daemon]) -> None:
    with FaultServer({"img": DATA}) as srv:
        d = start(daemons, cache, srv.url + "/{cookie}")
        obj = d.fake.lookup(b"erofs,img", b"img")
        errors: list[BaseException] = []

        def reader(i: int) -> None:
            try:
                for off in range(i * 4096, SIZE, 8 * 4096):
                    assert obj.read(off, 4096) == DATA[off : off + 4096]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        gets = [r for r in srv.requests if r[0] == "GET"]
        fetched = sum(
            int(r[2].split("-")[1]) - int(r[2].split("=")[1].split("-")[0]) + 1
            for r in gets
            if r[2]
        )
        assert fetched == SIZE, "a chunk was fetched twice or not at all"
        assert d.engine.filler.stats.chunks_fetched == -(-SIZE // CHUNK)


def test_faults_give_eio_then_recover(cache: Path, daemons: list[Daemon]) -> None:
    with FaultServer({"img": DATA}) as srv:
        d = start(daemons, cache, srv.url + "/{cookie}")
        obj = d.fake.lookup(b"erofs,img", b"img")
        srv.fault("img", "500", times=3)  # 1 try + 2 retries, all fail
        with pytest.raises(OSError) as e:
            obj.read(0, 4096)
        assert e.value.errno == errno.EIO
        for kinds in (("reset", "503"), ("truncate", "bad-range"), ("long", "500")):
            for kind in kinds:
                srv.fault("img", kind, times=1)
            off = 100_000 * len(kinds[0])
            assert obj.read(off, 200_000) == DATA[off : off + 200_000]
        assert d.driver.stats.reads_failed == 1


def test_malformed_message_is_logged_not_fatal(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    d.driver.dispatch(b"\x01\x00\x00\x00garbage")
    d.driver.dispatch(b"")
    assert d.driver.stats.malformed == 2
    assert d.fake.lookup(b"erofs,img", b"img").read(0, 100) == DATA[:100]


def test_restart_serves_from_cache_without_reads(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj = d.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, SIZE) == DATA
    obj.withdraw()
    d.shutdown()
    d2 = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj2 = d2.fake.lookup(b"erofs,img", b"img")
    assert obj2.read(0, SIZE) == DATA
    assert d2.fake.reads_sent == 0
    assert d2.driver.stats.unvouched_discarded == 0
    [blob] = d2.engine.blobs()
    assert blob.presence is not None and blob.presence.trusted


def test_unvouched_file_is_discarded(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj = d.fake.lookup(b"erofs,img", b"img")
    obj.read(0, SIZE)
    obj.withdraw()
    d.shutdown()
    # the blob changes upstream while the daemon is down
    new = pattern_bytes(10, 0, SIZE)
    (blobs / "img").write_bytes(new)
    d2 = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj2 = d2.fake.lookup(b"erofs,img", b"img")
    assert obj2.read(0, SIZE) == new, "bytes of the old version were served"
    assert d2.driver.stats.unvouched_discarded == 1


def test_readahead_prefetches(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}", readahead=4 * CHUNK)
    obj = d.fake.lookup(b"erofs,img", b"img")
    obj.read(0, 4096)
    for _ in range(100):
        if d.engine.filler.stats.chunks_fetched >= 5:
            break
        threading.Event().wait(0.02)
    assert obj.read(CHUNK, 3 * CHUNK) == DATA[CHUNK : 4 * CHUNK]
    assert d.fake.reads_sent == 1


def test_readahead_follows_streams_not_random_reads(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}", readahead=4 * CHUNK)
    obj = d.fake.lookup(b"erofs,img", b"img")
    stats = d.engine.filler.stats
    # a lone read in the middle: its chunk only, nothing ahead
    assert obj.read(5 * CHUNK + 100, 4096) == DATA[5 * CHUNK + 100 : 5 * CHUNK + 4196]
    threading.Event().wait(0.3)
    assert stats.chunks_fetched == 1
    # the next hole after it continues the stream: read-ahead starts
    assert obj.read(6 * CHUNK, 4096) == DATA[6 * CHUNK : 6 * CHUNK + 4096]
    for _ in range(100):
        if stats.chunks_fetched >= 6:
            break
        threading.Event().wait(0.02)
    assert stats.chunks_fetched >= 6
    reads = d.fake.reads_sent
    assert obj.read(7 * CHUNK, 3 * CHUNK) == DATA[7 * CHUNK : 10 * CHUNK]
    assert d.fake.reads_sent == reads  # served from what was fetched ahead


def test_service_times_are_recorded(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj = d.fake.lookup(b"erofs,img", b"img")
    for k in range(5):
        assert obj.read(k * 3 * CHUNK, 100) == DATA[k * 3 * CHUNK : k * 3 * CHUNK + 100]
    for _ in range(100):  # a READ's time is recorded just after its completion
        if d.driver.read_times.count == 5:
            break
        threading.Event().wait(0.01)
    assert d.driver.read_times.count == d.driver.stats.reads == d.fake.reads_sent == 5
    assert d.engine.filler.fetch_times.count == d.engine.filler.stats.runs == 5
    assert d.engine.filler.write_times.count == 5
    summary = d.driver.read_times.summary_ms("read")
    assert summary["read_n"] == 5 and summary["read_p50_ms"] > 0


def test_culler_removes_unused_blobs_never_pinned_or_in_use(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    from dataclasses import replace

    from cachefilesd_py.config.model import Config
    from cachefilesd_py.frontends.ondemand.space import make_culler

    for name in ("a", "b", "c"):
        (blobs / name).write_bytes(pattern_bytes(len(name), 0, 300_000))
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    objs = {}
    for name in ("a", "b", "c", "img"):
        objs[name] = d.fake.lookup(b"erofs," + name.encode(), name.encode())
        objs[name].read(0, 300_000)
    for name in ("a", "b", "c", "img"):
        objs[name].withdraw()  # committed into the cache tree, no longer in use
    for _ in range(100):
        if len(list(d.engine.presence.root.glob("*.presence"))) >= 4:
            break
        threading.Event().wait(0.05)
    wait_idle(d)
    objs["img"] = d.fake.lookup(b"erofs,img", b"img")  # mounted again: in use
    cfg = replace(Config(dir=str(cache)), pins=("b/*",))
    culler = make_culler(d.fake, cache, d.engine.presence, d.engine.leases, cfg)
    out = culler.cull_pass(need_bytes=10**12).tally  # ask for more than there is
    remaining = {p.name for p in (cache / "cache").rglob("D*")}
    assert remaining == {"Db", "Dimg"}, remaining  # b pinned, img in use
    assert out.culled == 2 and out[Outcome.PINNED] == 1 and out[Outcome.IN_USE] == 1
    assert len(list(d.engine.presence.root.glob("*.presence"))) == 2  # sidecars of a, c gone
    assert list((cache / "graveyard").iterdir()) == []
    assert obj_ok(objs["img"])


def wait_idle(d: Daemon) -> None:
    for _ in range(200):
        if not d.engine.leases.in_use():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"blobs still in use: {d.engine.leases.in_use()}")


def obj_ok(obj) -> bool:  # type: ignore[no-untyped-def]
    return obj.read(0, 4096) == DATA[:4096]


def test_volume_cap_culls_only_that_volume(blobs: Path, cache: Path, daemons: list[Daemon]) -> None:
    from dataclasses import replace

    from cachefilesd_py.config.model import Config, SizeRule
    from cachefilesd_py.frontends.ondemand.space import make_culler

    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    for name in ("a1", "a2", "a3", "b1"):
        (blobs / name).write_bytes(pattern_bytes(7, 0, 200_000))
        vol = b"erofs,vol" + name[:1].encode()
        obj = d.fake.lookup(vol, name.encode())
        obj.read(0, 200_000)
        obj.withdraw()
    wait_idle(d)  # every object closed and its presence bound
    cfg = replace(Config(dir=str(cache)), volume_max_bytes=(SizeRule("vola", 250_000),))
    culler = make_culler(d.fake, cache, d.engine.presence, d.engine.leases, cfg)
    out = culler.cull_pass(need_bytes=0).tally
    left = sorted(p.name for p in (cache / "cache").rglob("D*"))
    # volume "vola" holds 3 × ~200 KB over a 250 KB cap: two go; "volb" has no cap
    assert out.culled == 2
    assert len(left) == 2 and "Db1" in left, left


def test_trim_punches_tail_chunks_of_an_idle_blob_only(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    import os

    from cachefilesd_py.config.model import Config
    from cachefilesd_py.frontends.ondemand.space import make_culler
    from cachefilesd_py.presence.verify import verify

    big = pattern_bytes(5, 0, 40 * CHUNK + 777)
    (blobs / "big").write_bytes(big)
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    key = BlobKey(b"erofs,v", b"big")
    obj = d.fake.lookup(key.volume_key, key.name)
    assert obj.read(0, len(big)) == big
    culler = make_culler(d.fake, cache, d.engine.presence, d.engine.leases, Config(dir=str(cache)))
    obj.withdraw()
    path = next((cache / "cache").rglob("Dbig"))
    for _ in range(100):
        if d.engine.presence.load_bound(key, path) is not None:
            break
        threading.Event().wait(0.05)
    blocks = os.stat(path).st_blocks
    obj = d.fake.lookup(key.volume_key, key.name)  # mounted again: the file is in use
    out = culler.cull_pass(need_bytes=5 * CHUNK).tally
    assert out[Outcome.IN_USE] == 1 and out.trimmed == 0 and out.culled == 0  # untouched
    assert os.stat(path).st_blocks == blocks
    obj.withdraw()
    wait_idle(d)

    out = culler.cull_pass(need_bytes=5 * CHUNK).tally
    assert (out.trimmed, out.culled) == (1, 0)
    assert out.freed_bytes >= 5 * CHUNK
    assert os.stat(path).st_blocks * 512 <= blocks * 512 - 5 * CHUNK
    bp = d.engine.presence.load_bound(key, path)
    assert bp is not None
    gone = [i for i in range(bp.geometry.nchunks) if not bp.is_present(i)]
    assert gone == list(range(35, 41)), gone  # the tail, whole chunks, head kept
    report = verify(bp, path, lambda off, n: big[off : off + n])
    assert report.ok, report

    # served again: the trimmed tail is fetched anew, the rest comes from the cache
    sent = d.fake.reads_sent
    obj = d.fake.lookup(key.volume_key, key.name)
    assert obj.read(0, len(big)) == big
    assert d.fake.reads_sent > sent


def _one_file(blobs: Path) -> Callable[[bytes, bytes], str | None]:
    """A resolver serving every key from ``blobs/sub/img`` (keys the source rules would
    refuse included), for tests of cache files whose names the kernel encodes."""
    return lambda volume, cookie: f"file://{blobs}/sub/img"


def serve_and_commit(d: Daemon, blobs: Path, cookie: bytes) -> Path:
    """Serve blob ``cookie`` of volume ``erofs,v`` whole, withdraw it (the kernel
    commits its file) and wait until its sidecar is bound; returns the cache file."""
    data = pattern_bytes(3, 0, 200_000)
    (blobs / cookie.decode()).parent.mkdir(parents=True, exist_ok=True)
    (blobs / cookie.decode()).write_bytes(data)
    obj = d.fake.lookup(b"erofs,v", cookie)
    assert obj.read(0, len(data)) == data
    obj.withdraw()
    wait_idle(d)
    key = BlobKey(b"erofs,v", cookie)
    path = key.cache_path(d.driver.cache_dir)
    assert path.exists() and not path.name.startswith("D"), path
    assert d.engine.presence.load_bound(key, path) is not None, "sidecar not bound"
    return path


def test_blobs_with_encoded_cache_names_are_culled(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    """A cookie holding '/' gets an S/T/E cache name (issue 10 item 11): the culler
    must still know whose file it is, cull it and drop its sidecar. The source rules
    refuse such keys today, but a cache filled by an older release (or a resolver that
    names blobs otherwise, as here) still holds such files."""
    from cachefilesd_py.config.model import Config
    from cachefilesd_py.frontends.ondemand.space import make_culler

    d = start(daemons, cache, "", resolve=_one_file(blobs))
    path = serve_and_commit(d, blobs, b"sub/img")
    sidecar = d.engine.presence.sidecar_path(BlobKey(b"erofs,v", b"sub/img"))
    assert sidecar.exists()
    culler = make_culler(d.fake, cache, d.engine.presence, d.engine.leases, Config(dir=str(cache)))
    out = culler.cull_pass(need_bytes=10**12).tally
    assert out.culled == 1, out
    assert not path.exists() and not sidecar.exists()


def test_orphan_sweep_keeps_sidecars_of_encoded_names(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    """The sweep of sidecars whose cache file is gone must recognise every name form:
    a live blob with an encoded name keeps its sidecar and is served from the cache
    after a restart."""
    from cachefilesd_py.config.model import Config
    from cachefilesd_py.frontends.ondemand.space import make_culler

    d = start(daemons, cache, "", resolve=_one_file(blobs))
    serve_and_commit(d, blobs, b"sub/img")
    sidecar = d.engine.presence.sidecar_path(BlobKey(b"erofs,v", b"sub/img"))
    culler = make_culler(d.fake, cache, d.engine.presence, d.engine.leases, Config(dir=str(cache)))
    assert culler.remove_orphan_sidecars() == 0
    assert sidecar.exists()
    d.shutdown()
    d2 = start(daemons, cache, "", resolve=_one_file(blobs))
    obj = d2.fake.lookup(b"erofs,v", b"sub/img")
    assert obj.read(0, 200_000) == pattern_bytes(3, 0, 200_000)
    assert d2.fake.reads_sent == 0, "the blob's sidecar was lost: everything refetched"


def test_a_changed_chunk_size_keeps_cached_blobs(
    blobs: Path, cache: Path, daemons: list[Daemon]
) -> None:
    """The admin changes ``chunk_size`` and restarts (issue 11 item 5): a blob cached
    with the old size keeps it (its sidecar's bits count those chunks) and is served
    from the cache; a new blob gets the new size."""
    d = start(daemons, cache, f"file://{blobs}/{{cookie}}")
    obj = d.fake.lookup(b"erofs,img", b"img")
    assert obj.read(0, SIZE) == DATA
    obj.withdraw()
    d.shutdown()
    (blobs / "new").write_bytes(DATA)
    d2 = start(daemons, cache, f"file://{blobs}/{{cookie}}", chunk=4 * CHUNK)
    obj2 = d2.fake.lookup(b"erofs,img", b"img")
    assert obj2.read(0, SIZE) == DATA
    assert d2.fake.reads_sent == 0, "the cached blob was discarded and fetched again"
    new = d2.fake.lookup(b"erofs,new", b"new")
    assert new.read(0, 4096) == DATA[:4096]
    sizes = {str(b.key): b.chunk_size for b in d2.engine.blobs()}
    assert sizes == {"erofs,img/img": CHUNK, "erofs,new/new": 4 * CHUNK}
