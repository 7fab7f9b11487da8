"""Which real fetch errors count as "the server could not be reached": the errors come
from the real HTTP source (urllib3 over loopback), so the test follows urllib3's way
of wrapping socket errors, not a guess of it."""

from __future__ import annotations

import socket

import pytest
import urllib3

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.netlink import failure_kind
from cachefilesd_py.sources.online import FailureKind
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.testing.fault_server import FaultServer
from cachefilesd_py.testing.pattern import pattern_bytes

DATA = pattern_bytes(2, 0, 100_000)


def error_of(src: HttpSource, deadline: float = 5.0) -> SourceError:
    with pytest.raises(SourceError) as info:
        src.fetch_into(0, memoryview(bytearray(4096)), Deadline.after(deadline))
    return info.value


def source(url: str, timeout: float = 5.0) -> HttpSource:
    return HttpSource(url, pool=urllib3.PoolManager(), retry=RetryPolicy(total=0),
                      timeout=timeout)


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # nothing listens on the port now
    assert failure_kind(error_of(source(f"http://127.0.0.1:{port}/b"))) is FailureKind.REFUSED


def test_a_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)  # accepts connections (the kernel does) but never answers
        port = listener.getsockname()[1]
        err = error_of(source(f"http://127.0.0.1:{port}/b", timeout=0.3), deadline=0.5)
    assert failure_kind(err) is FailureKind.TIMEOUT


@pytest.mark.parametrize("fault", ["503", "404", "truncate"])
def test_a_server_that_answers_is_reachable(fault: str) -> None:
    with FaultServer({"b": DATA}) as srv:
        src = source(srv.url + "/b")
        src.identity(Deadline.after(5))
        srv.fault("b", fault, times=5)
        assert failure_kind(error_of(src)) is None


def test_unreachable_errno() -> None:
    import errno

    exc = SourceError("x", transient=True, reason="connect")
    exc.__cause__ = OSError(errno.ENETUNREACH, "Network is unreachable")
    assert failure_kind(exc) is FailureKind.UNREACHABLE
