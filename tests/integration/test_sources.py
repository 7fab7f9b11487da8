"""Sources against real files and a loopback HTTP server with faults: every fault ends
in correct data after a retry or a clean SourceError, and never in a buffer reported
good with wrong bytes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import urllib3

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources.file import FileSource
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.testing.check_source import check_source
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

DATA = pattern_bytes(1, 0, 300_000)


def fetch(src: HttpSource | FileSource, off: int, n: int, deadline: float = 10) -> bytes:
    buf = bytearray(b"\xee" * n)
    src.fetch_into(off, memoryview(buf), Deadline.after(deadline))
    return bytes(buf)


def test_file_source_conformance(tmp_path: Path) -> None:
    def make(data: bytes) -> FileSource:
        p = tmp_path / "blob"
        p.write_bytes(data)
        return FileSource(str(p))

    check_source(make)


def test_http_source_conformance() -> None:
    servers: list[FaultServer] = []

    def make(data: bytes) -> HttpSource:
        srv = FaultServer({"b": data}).__enter__()
        servers.append(srv)
        return HttpSource(srv.url + "/b", pool=urllib3.PoolManager(maxsize=8))

    try:
        check_source(make)
    finally:
        for s in servers:
            s.__exit__(None, None, None)


@pytest.mark.parametrize("kind", ["500", "503", "reset", "truncate", "bad-range", "long"])
def test_transient_faults_are_retried_to_correct_data(kind: str) -> None:
    with FaultServer({"b": DATA}) as srv:
        src = HttpSource(
            srv.url + "/b", pool=urllib3.PoolManager(), retry=RetryPolicy(total=3, backoff=0.01)
        )
        src.identity(Deadline.after(5))
        srv.fault("b", kind, times=2)
        assert fetch(src, 8192, 100_000) == DATA[8192:108_192]


@pytest.mark.parametrize("kind", ["500", "reset", "truncate", "bad-range"])
def test_persistent_faults_end_in_a_clean_error(kind: str) -> None:
    with FaultServer({"b": DATA}) as srv:
        src = HttpSource(
            srv.url + "/b", pool=urllib3.PoolManager(), retry=RetryPolicy(total=2, backoff=0.01)
        )
        src.identity(Deadline.after(5))
        srv.fault("b", kind, times=10)
        with pytest.raises(SourceError) as e:
            fetch(src, 0, 50_000)
        assert e.value.transient


def test_200_instead_of_206_is_refused() -> None:
    with FaultServer({"b": DATA}) as srv:
        src = HttpSource(srv.url + "/b", pool=urllib3.PoolManager(), retry=RetryPolicy(total=0))
        src.identity(Deadline.after(5))
        srv.fault("b", "full")
        with pytest.raises(SourceError, match="200"):
            fetch(src, 0, 4096)


def test_stall_ends_within_the_deadline() -> None:
    with FaultServer({"b": DATA}, stall_seconds=3) as srv:
        src = HttpSource(
            srv.url + "/b",
            pool=urllib3.PoolManager(),
            retry=RetryPolicy(total=5, backoff=0.01),
            timeout=30,
        )
        src.identity(Deadline.after(5))
        srv.fault("b", "stall", times=10)
        start = time.monotonic()
        with pytest.raises(SourceError):
            fetch(src, 0, 4096, deadline=1.0)
        assert time.monotonic() - start < 2.9


def test_etag_change_is_refused_loudly() -> None:
    with FaultServer({"b": DATA}) as srv:
        src = HttpSource(srv.url + "/b", pool=urllib3.PoolManager())
        src.identity(Deadline.after(5))
        srv.replace("b", DATA[::-1], '"v2"')
        with pytest.raises(IdentityChanged):
            fetch(src, 0, 4096)


def test_missing_blob_is_not_found() -> None:
    with FaultServer({}) as srv:
        src = HttpSource(srv.url + "/nope", pool=urllib3.PoolManager())
        with pytest.raises(SourceNotFound):
            src.identity(Deadline.after(5))


def test_file_source_detects_a_rewritten_blob(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    p.write_bytes(DATA)
    src = FileSource(str(p))
    src.identity(Deadline.after(1))
    time.sleep(0.01)
    with open(p, "r+b") as f:
        f.write(b"changed")
    with pytest.raises(IdentityChanged):
        fetch(src, 0, 10)
    with pytest.raises(SourceNotFound):
        FileSource(str(tmp_path / "absent")).identity(Deadline.after(1))


def test_factory_by_scheme(tmp_path: Path) -> None:
    f = SourceFactory()
    assert isinstance(f.open(f"file://{tmp_path}/x"), FileSource)
    assert isinstance(f.open("http://127.0.0.1:1/x"), HttpSource)
    a, b = f.open("http://127.0.0.1:1/x"), f.open("http://127.0.0.1:1/x")
    # one handle per OPEN (identity learnt afresh, then pinned), shared pools below
    assert a is not b and isinstance(a, HttpSource) and isinstance(b, HttpSource)
    assert a.pool is b.pool and a.identity_pool is b.identity_pool
    assert a.origin == "http://127.0.0.1:1"
    assert f.open("https://h/x").origin == "https://h:443"
    assert f.open(f"file://{tmp_path}/x").origin == "file:"
    with pytest.raises(SourceError):
        f.open("ftp://h/x")
