"""Disconnected operation through the on-demand driver (issue 14 items 2 and 3): the
fake kernel, the fault HTTP server, and the real connectivity state machine fed path
facts by the test (``testing/connectivity.py``).

- a fetch to an offline source is not attempted (the server sees no request);
- ``error``: a READ of missing bytes fails at once; cached bytes are still served;
- ``wait``: the READ is held without holding a worker or the request loop (another
  origin's READs go on), and completes once the source is back; at its cap it fails;
- a pinned blob's missing bytes fail at once even under ``wait``;
- switching the policy at run time re-asks held READs; shutdown answers them;
- fetch failures (connection refused) take a source offline after three in a row.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.engine.offline import OfflineError
from cachefilesd_py.engine.offline_policy import OfflinePolicies, OfflinePolicy
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.online import Hysteresis, Status
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.connectivity import ScriptedConnectivity
from cachefilesd_py.testing.fake_kernel import Background, FakeCachefiles
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

SIZE = 512 * 1024
CHUNK = 64 * 1024
PATIENCE = 20.0


@dataclass
class Stack:
    fake: FakeCachefiles
    driver: OnDemandDriver
    engine: Engine
    net: ScriptedConnectivity
    far: FaultServer
    near: FaultServer
    stop: threading.Event
    thread: threading.Thread

    def open(self, volume: str, name: str) -> object:
        return self.fake.lookup(f"erofs,{volume}".encode(), name.encode(), PATIENCE)

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.driver.shutdown()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    far = FaultServer({f"b{i}": pattern_bytes(i, 0, SIZE) for i in range(4)})
    near = FaultServer({"n": pattern_bytes(50, 0, SIZE)})
    with far, near:
        fake = FakeCachefiles()
        rules = [
            SourceRule("far/*", far.url + "/{cookie}"),
            SourceRule("near/*", near.url + "/{cookie}"),
        ]
        engine = Engine(
            resolve=SourceResolver(rules).resolve,
            open_source=SourceFactory(SourceSettings(retries=0, timeout=5.0)).open,
            presence=PresenceStore(tmp_path / "presence"),
            settings=EngineSettings(chunk_size=CHUNK, fetch_timeout=5.0, buffers=8),
        )
        net = ScriptedConnectivity([far.url, near.url])
        engine.gate.connectivity = net
        engine.gate.tracked = frozenset({far.url, near.url})
        driver = OnDemandDriver(fake, engine, tmp_path, workers=2, fetch_timeout=5.0)
        net.on_transition.append(lambda tr: driver.source_changed(tr.source))
        driver.bind([b"dir " + str(tmp_path).encode()])
        stop = threading.Event()
        thread = threading.Thread(target=driver.serve, args=(stop, 0.05))
        thread.start()
        st = Stack(fake, driver, engine, net, far, near, stop, thread)
        try:
            yield st
        finally:
            if not stop.is_set():
                st.shutdown()
            fake.close()


def gets(server: FaultServer) -> int:
    return sum(1 for r in server.requests if r[0] == "GET")


def test_offline_source_error_policy_fails_missing_bytes_at_once_without_fetching(
    stack: Stack,
) -> None:
    obj = stack.open("far", "b0")
    assert obj.read(0, CHUNK, PATIENCE) == pattern_bytes(0, 0, CHUNK)  # cached now
    stack.net.link(stack.far.url, up=False)
    assert stack.net.status(stack.far.url) is Status.OFFLINE
    before = gets(stack.far)
    began = time.monotonic()
    with pytest.raises(OSError):
        obj.read(4 * CHUNK, CHUNK, PATIENCE)
    assert time.monotonic() - began < PATIENCE / 2
    assert gets(stack.far) == before, "a fetch to an offline source was attempted"
    assert stack.net.refused == 0  # the policy said no before the gate was asked
    assert obj.read(0, CHUNK, PATIENCE) == pattern_bytes(0, 0, CHUNK)  # cached: served
    assert stack.driver.stats.reads_offline_failed == 1


def test_wait_policy_holds_the_read_without_stalling_others_then_completes(
    stack: Stack,
) -> None:
    stack.engine.gate.policies = OfflinePolicies(default=OfflinePolicy.parse("wait 60"))
    waiting: list[tuple[BlobKey, int, int, float]] = []
    stack.driver.on_read_waiting = lambda *a: waiting.append(a)
    far = [stack.open("far", f"b{i}") for i in range(3)]
    near = stack.open("near", "n")
    stack.net.link(stack.far.url, up=False)
    held = [Background(o.read, 0, SIZE, 2 * PATIENCE) for o in far]  # > workers (2)
    while stack.driver.stats.reads_held < 3:
        time.sleep(0.01)
    # every worker would be taken if held READs held one: the near origin goes on
    assert near.read(0, SIZE, PATIENCE) == pattern_bytes(50, 0, SIZE)
    assert not any(b.done() for b in held), "a held READ was answered while offline"
    assert len(stack.driver.held) == 3
    assert stack.driver.oldest_read_age() is None  # the watchdog does not see held READs
    assert len(waiting) == 3 and waiting[0][3] == 60.0
    stack.net.link(stack.far.url, up=True)
    for i, b in enumerate(held):
        assert b.result(PATIENCE) == pattern_bytes(i, 0, SIZE)
    assert stack.driver.stats.reads_held == 3  # each announced once


def test_wait_policy_fails_the_read_at_its_cap(stack: Stack) -> None:
    stack.engine.gate.policies = OfflinePolicies(default=OfflinePolicy.parse("wait 1"))
    obj = stack.open("far", "b1")
    stack.net.link(stack.far.url, up=False)
    began = time.monotonic()
    with pytest.raises(OSError):
        obj.read(0, CHUNK, PATIENCE)
    assert time.monotonic() - began >= 1.0
    assert stack.driver.stats.reads_held == 1


def test_pinned_blob_with_missing_bytes_fails_at_once_under_wait(stack: Stack) -> None:
    stack.engine.gate.policies = OfflinePolicies(default=OfflinePolicy.parse("wait 60"))
    stack.engine.gate.is_pinned = lambda key: key.name == b"b2"
    obj = stack.open("far", "b2")
    stack.net.link(stack.far.url, up=False)
    with pytest.raises(OSError):
        obj.read(0, CHUNK, PATIENCE)
    assert stack.driver.stats.reads_held == 0


def test_policy_rule_per_volume_and_run_time_switch_wakes_held_reads(stack: Stack) -> None:
    gate = stack.engine.gate
    gate.set_policy("far/*", OfflinePolicy.parse("wait 60"))
    obj = stack.open("far", "b3")
    stack.net.link(stack.far.url, up=False)
    held = Background(obj.read, 0, CHUNK, PATIENCE)
    while stack.driver.stats.reads_held < 1:
        time.sleep(0.01)
    gate.set_policy("far/*", OfflinePolicy.parse("error"))
    stack.driver.policy_changed()
    with pytest.raises(OSError):
        held.result(PATIENCE)


def test_shutdown_answers_held_reads(stack: Stack) -> None:
    stack.engine.gate.policies = OfflinePolicies(default=OfflinePolicy.parse("wait 600"))
    obj = stack.open("far", "b0")
    stack.net.link(stack.far.url, up=False)
    held = Background(obj.read, 0, CHUNK, PATIENCE)
    while stack.driver.stats.reads_held < 1:
        time.sleep(0.01)
    stack.shutdown()
    with pytest.raises(OSError):
        held.result(PATIENCE)


def test_refused_connections_take_the_source_offline_then_no_attempt(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    engine = Engine(
        resolve=SourceResolver([SourceRule("*", origin + "/{cookie}")]).resolve,
        open_source=SourceFactory(SourceSettings(retries=0, timeout=2.0)).open,
        presence=PresenceStore(tmp_path / "presence"),
    )
    net = ScriptedConnectivity([origin], hysteresis=Hysteresis(probe_first=3600, probe_max=3600))
    engine.gate.connectivity = net
    engine.gate.tracked = frozenset({origin})
    key = BlobKey(b"erofs,v", b"blob")
    for _ in range(3):
        with pytest.raises(Exception) as err:
            engine.open_blob(key, None, Deadline.after(5))
        assert not isinstance(err.value, OfflineError)
    assert net.status(origin) is Status.OFFLINE
    assert "connection refused" in net.state(origin).reason
    with pytest.raises(OfflineError):
        engine.open_blob(key, None, Deadline.after(5))
    assert net.refused == 1
