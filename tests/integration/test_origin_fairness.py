"""One stalled origin must not delay another origin's OPENs or READs (issue 10 item 6):
the OPEN and READ work runs in lanes per origin, each with its own limit, and OPENs
never wait behind fills. The stalled server holds every request it gets until the
test lets it go, so "not delayed" is shown by order, not by timing: the healthy blob
is opened and read while every stalled request is still held."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import IDENTITY_POOL_SIZE, SourceFactory, SourceSettings
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.fake_kernel import Background, FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

SIZE = 300_000
STALLED = [f"s{i}" for i in range(12)]
#: longer than any wait in this test: a stalled request ends only when released
HOLD = 120.0
#: how long the healthy blob may take before the test calls it starved
PATIENCE = 20.0


@pytest.fixture
def servers() -> Iterator[tuple[FaultServer, FaultServer]]:
    slow = FaultServer({n: pattern_bytes(i, 0, SIZE) for i, n in enumerate(STALLED)})
    slow.stall_seconds = HOLD
    good = FaultServer({"good": pattern_bytes(99, 0, SIZE)})
    with slow, good:
        yield slow, good
        slow.unstall.set()


@pytest.fixture
def stack(tmp_path: Path, servers: tuple[FaultServer, FaultServer]) -> Iterator[FakeCachefiles]:
    slow, good = servers
    fake = FakeCachefiles()
    rules = [
        SourceRule("slow/*", slow.url + "/{cookie}"),
        SourceRule("good/*", good.url + "/{cookie}"),
    ]
    engine = Engine(
        resolve=SourceResolver(rules).resolve,
        open_source=SourceFactory(SourceSettings(retries=0, timeout=HOLD, pool_size=32)).open,
        presence=PresenceStore(tmp_path / "presence"),
        settings=EngineSettings(chunk_size=64 * 1024, fetch_timeout=HOLD, buffers=16),
    )
    driver = OnDemandDriver(fake, engine, tmp_path, workers=4, open_workers=4, fetch_timeout=HOLD)
    driver.bind([b"dir " + str(tmp_path).encode()])
    stop = threading.Event()
    thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
    thread.start()
    yield fake
    slow.unstall.set()
    stop.set()
    thread.join(30)
    driver.shutdown()
    fake.close()


def test_a_stalled_origin_does_not_delay_another_origins_open(
    servers: tuple[FaultServer, FaultServer], stack: FakeCachefiles
) -> None:
    slow, _good = servers
    for name in STALLED:
        slow.fault(name, "stall")  # every OPEN of the slow origin hangs in its HEAD
    stalled = [Background(stack.lookup, b"erofs,slow", n.encode(), HOLD) for n in STALLED]
    # the slow origin holds as many workers as it may: its HEADs are bounded by the
    # identity connections per origin, the rest wait for one inside their OPEN worker
    while len(slow.requests) < IDENTITY_POOL_SIZE:
        threading.Event().wait(0.01)
    good = stack.lookup(b"erofs,good", b"good", PATIENCE)
    assert good.read(0, SIZE, PATIENCE) == pattern_bytes(99, 0, SIZE)
    assert not any(b.done() for b in stalled), "a stalled OPEN was answered: nothing proven"
    slow.unstall.set()
    for b in stalled:
        b.result(HOLD)


def test_a_stalled_origin_does_not_delay_another_origins_reads(
    servers: tuple[FaultServer, FaultServer], stack: FakeCachefiles
) -> None:
    slow, _good = servers
    objects = [stack.lookup(b"erofs,slow", n.encode(), PATIENCE) for n in STALLED]
    good = stack.lookup(b"erofs,good", b"good", PATIENCE)
    for name in STALLED:
        slow.fault(name, "stall", times=10)  # every fetch of the slow origin hangs
    heads = len(slow.requests)
    stalled = [Background(o.read, 0, 4096, HOLD) for o in objects]
    while len(slow.requests) < heads + 3:
        threading.Event().wait(0.01)
    assert good.read(0, SIZE, PATIENCE) == pattern_bytes(99, 0, SIZE)
    assert not any(b.done() for b in stalled), "a stalled READ was answered: nothing proven"
    slow.unstall.set()
    for i, b in enumerate(stalled):
        assert b.result(HOLD) == pattern_bytes(i, 0, 4096)
