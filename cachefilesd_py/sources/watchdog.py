"""Deadlines that hold for a whole HTTP exchange, not for one ``recv``.

A socket timeout bounds one blocking call. urllib3 and ``http.client`` read a status
line, headers and a body with as many ``recv`` calls as the bytes come in, so an origin
that trickles one byte every half second never trips a 2 s read timeout: a READ whose
deadline was 2 s stayed busy 12 s, and a slow ``HEAD`` held an OPEN as long.

Here every exchange (connect, TLS handshake, request, status line, headers, body) runs
under an :class:`Exchange` armed with the caller's deadline. The connection classes of
:func:`pool_manager` enrol themselves in the exchange of the thread that uses them
(when they connect and when they send a request), and one watchdog thread, when a
deadline passes, shuts their sockets down (``shutdown(SHUT_RDWR)``). The kernel then
wakes the blocked ``recv``/``send``/``connect`` at once with EOF or an error, whatever
the library was in the middle of, and the caller sees an error it turns into a
``SourceError`` with reason ``deadline``. A shut-down socket is never reused: the pool
drops a connection whose exchange failed.

What no socket operation covers: name resolution (``getaddrinfo`` blocks in libc, with
the resolver's own timeouts from ``resolv.conf``). Waiting for a free connection of a
full pool is bounded separately, with urllib3's ``pool_timeout``.

Lock order: ``Watchdog._cond`` is the only lock; ``Exchange`` state is guarded by it.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from cachefilesd_py.sources.policy import Deadline


class Exchange:
    """One request/response exchange under a deadline (see the module docstring)."""

    __slots__ = ("_conns", "armed", "at", "expired")

    def __init__(self, at: float) -> None:
        self.at = at
        self.armed = True
        self.expired = False
        self._conns: list[Any] = []

    def _kill(self) -> None:
        self.expired = True
        for conn in self._conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """One thread that shuts down the sockets of exchanges past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Exchange]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        #: exchanges ended by the watchdog (for stats and tests)
        self.fired = 0

    @contextmanager
    def exchange(self, deadline: Deadline) -> Iterator[Exchange]:
        """Run the ``with`` block as one exchange: the connections it uses are shut
        down when ``deadline`` passes. Not reentrant within one thread."""
        ex = Exchange(time.monotonic() + deadline.remaining())
        with self._cond:
            heapq.heappush(self._heap, (ex.at, next(self._seq), ex))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="http-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        self._local.current = ex
        try:
            yield ex
        finally:
            self._local.current = None
            with self._cond:
                ex.armed = False

    def enrol(self, conn: object) -> None:
        """Called by a connection about to block: it belongs to this thread's exchange."""
        ex: Exchange | None = getattr(self._local, "current", None)
        if ex is None:
            return
        with self._cond:
            if conn not in ex._conns:
                ex._conns.append(conn)
            if ex.expired:  # enrolled after the deadline: kill at once
                ex._kill()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and not self._heap[0][2].armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(60.0)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                at, _, ex = self._heap[0]
                now = time.monotonic()
                if now < at:
                    self._cond.wait(at - now)
                    continue
                heapq.heappop(self._heap)
                if ex.armed:
                    self.fired += 1
                    ex._kill()


#: the process's watchdog (one thread, started when the first exchange begins)
WATCHDOG = Watchdog()


class _Enrolled:
    """Mixin for urllib3 connections: enrol in the thread's exchange before blocking."""

    def connect(self) -> None:
        WATCHDOG.enrol(self)
        super().connect()  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        WATCHDOG.enrol(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _DeadlineHTTPConnection(_Enrolled, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_Enrolled, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


def pool_manager(
    *, maxsize: int, num_pools: int = 32, ssl_context: Any = None
) -> urllib3.PoolManager:
    """A ``PoolManager`` whose connections obey :meth:`Watchdog.exchange` deadlines.

    ``block=True``: at most ``maxsize`` connections per origin exist at once, a request
    waits for a free one (bounded by its ``pool_timeout``) instead of opening more."""
    pm = urllib3.PoolManager(
        num_pools=num_pools, maxsize=maxsize, block=True, ssl_context=ssl_context
    )
    pm.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return pm
