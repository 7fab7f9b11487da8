"""A flood of requests queues in the kernel, not in the daemon (issue 10, bounds): the
driver stops reading the device while its READ scheduler holds ``capacity`` requests,
reads on as room comes back, and every request is answered in the end. A CLOSE that
arrives while reading is paused is read within a READ's deadline at the latest."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.fake_kernel import Background, FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

CHUNK = 64 * 1024
SIZE = 64 * CHUNK
CAPACITY = 8
READERS = 40
WAIT = 60.0


def unread_reads(fake: FakeCachefiles) -> int:
    return sum(1 for _m, op, new in fake.pending() if op == wire.OP_READ and new)


def wait_for_a_pause(driver: OnDemandDriver) -> None:
    while driver.stats.read_pauses == 0:  # the scheduler filled up
        threading.Event().wait(0.01)


def stop_stack(
    fake: FakeCachefiles, driver: OnDemandDriver, stop: threading.Event, thread: threading.Thread
) -> None:
    stop.set()
    thread.join(30)
    driver.shutdown()
    fake.close()


def make_stack(
    tmp_path: Path, srv: FaultServer, fetch_timeout: float
) -> tuple[FakeCachefiles, OnDemandDriver, threading.Event, threading.Thread]:
    fake = FakeCachefiles()
    engine = Engine(
        resolve=SourceResolver([SourceRule("*", srv.url + "/{cookie}")]).resolve,
        open_source=SourceFactory(SourceSettings(retries=0, timeout=fetch_timeout)).open,
        presence=PresenceStore(tmp_path / "presence"),
        settings=EngineSettings(chunk_size=CHUNK, fetch_timeout=fetch_timeout, buffers=4),
    )
    driver = OnDemandDriver(
        fake, engine, tmp_path, workers=2, fetch_timeout=fetch_timeout, capacity=CAPACITY
    )
    driver.bind([b"dir " + str(tmp_path).encode()])
    stop = threading.Event()
    thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
    thread.start()
    return fake, driver, stop, thread


@pytest.fixture
def server() -> Iterator[FaultServer]:
    srv = FaultServer({"img": pattern_bytes(5, 0, SIZE), "other": pattern_bytes(6, 0, SIZE)})
    srv.stall_seconds = WAIT
    with srv:
        yield srv
        srv.unstall.set()


def test_a_read_flood_waits_in_the_kernel_and_is_served_in_the_end(
    tmp_path: Path, server: FaultServer
) -> None:
    fake, driver, stop, thread = make_stack(tmp_path, server, fetch_timeout=WAIT)
    try:
        obj = fake.lookup(b"erofs,img", b"img")
        server.fault("img", "stall", times=1000)  # the origin stops answering
        floods = [Background(obj.read, (i % 64) * CHUNK, 4096, WAIT) for i in range(READERS)]
        wait_for_a_pause(driver)
        assert driver.reads.held <= CAPACITY
        assert unread_reads(fake) >= READERS - CAPACITY - 2, "the driver read the flood"
        server.unstall.set()
        data = pattern_bytes(5, 0, SIZE)
        for i, b in enumerate(floods):
            off = (i % 64) * CHUNK
            assert b.result(WAIT) == data[off : off + 4096]
        assert unread_reads(fake) == 0
    finally:
        server.unstall.set()
        stop_stack(fake, driver, stop, thread)


def test_a_close_is_read_within_a_deadline_while_reading_is_paused(
    tmp_path: Path, server: FaultServer
) -> None:
    """The origin never answers again: the queued READs run out of time (the readers
    get EIO), room comes back, and the CLOSE queued behind them is read."""
    fake, driver, stop, thread = make_stack(tmp_path, server, fetch_timeout=2.0)
    try:
        other = fake.lookup(b"erofs,other", b"other")
        obj = fake.lookup(b"erofs,img", b"img")
        server.fault("img", "stall", times=1000)
        floods = [Background(obj.read, (i % 64) * CHUNK, 4096, WAIT) for i in range(READERS)]
        wait_for_a_pause(driver)
        other.withdraw(timeout=WAIT)  # CLOSE: read once the stalled READs expired
        for b in floods:
            with pytest.raises(OSError):
                b.result(WAIT)
        assert driver.stats.reads_expired > 0
    finally:
        server.unstall.set()
        stop_stack(fake, driver, stop, thread)
