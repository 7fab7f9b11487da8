"""Turning a URL into a :class:`Source`: a new handle per call, shared resources below.

Every ``open(url)`` returns a new source (one opening of the blob, whose identity is
learnt afresh and then pinned, see ``sources/base.py``). What handles share lives
here, bounded:

- HTTP: one urllib3 pool manager for fetches and one for identities (``HEAD``), so an
  OPEN never waits behind the fills of a slow origin for a connection. Each keeps at
  most ``pool_size`` (fetches) or :data:`IDENTITY_POOL_SIZE` (identities) connections
  per origin and blocks for a free one no longer than the caller's deadline;
- files: one :class:`SourceFds` table of open files (at most ``max_open_files`` and a
  quarter of ``RLIMIT_NOFILE``, closed after ``idle_seconds`` unused);
- all sources: at most ``max_inflight`` fetches in flight at once, whatever their
  origin (each holds at most one caller buffer and, for HTTP, a read piece).
"""

from __future__ import annotations

import resource
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import urllib3

from cachefilesd_py.counters import LabelledCounts
from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.base import MAX_BLOB_SIZE, Source
from cachefilesd_py.sources.file import FileSource, SourceFds
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.policy import RetryPolicy
from cachefilesd_py.sources.watchdog import pool_manager

IDENTITY_POOL_SIZE = 2


@dataclass(frozen=True)
class SourceSettings:
    ca_file: str | None = None
    headers_for: Callable[[str], dict[str, str]] | None = None
    timeout: float = 30.0
    retries: int = 3
    #: connections per HTTP origin for fetches
    pool_size: int = 8
    #: fetches in flight at once, all sources together
    max_inflight: int = 64
    #: source files kept open at once, and how long an unused one stays open
    max_open_files: int = 256
    idle_seconds: float = 30.0
    #: the largest blob accepted (capped at 16 TiB, ``sources/base.py``)
    max_blob_size: int = MAX_BLOB_SIZE


def open_files_budget(wanted: int) -> int:
    """How many source files may stay open: ``wanted``, but never more than a quarter
    of the soft ``RLIMIT_NOFILE`` (the rest is for anonymous fds, sockets, sidecars)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max(1, wanted)
    return max(1, min(wanted, soft // 4))


class SourceFactory:
    """Opens sources by URL (see the module docstring)."""

    def __init__(self, settings: SourceSettings | None = None) -> None:
        self.settings = settings or SourceSettings()
        self._lock = threading.Lock()
        self._pools: tuple[urllib3.PoolManager, urllib3.PoolManager] | None = None
        self.fds = SourceFds(
            open_files_budget(self.settings.max_open_files), self.settings.idle_seconds
        )
        self.gate = threading.BoundedSemaphore(max(1, self.settings.max_inflight))
        #: retries its sources took, by source label (``sources/resolve.py`` rule_label)
        self.retries = LabelledCounts()

    def _http_pools(self) -> tuple[urllib3.PoolManager, urllib3.PoolManager]:
        with self._lock:
            if self._pools is None:
                ctx = ssl.create_default_context(cafile=self.settings.ca_file)
                self._pools = (
                    pool_manager(maxsize=max(1, self.settings.pool_size), ssl_context=ctx),
                    pool_manager(maxsize=IDENTITY_POOL_SIZE, ssl_context=ctx),
                )
            return self._pools

    def prepare_http(self) -> None:
        """Build the HTTP(S) connection pools now rather than at the first HTTP source
        opened. Their TLS context loads the system's CA bundle: 0.1 s on a host, about
        4 s in the TCG test guest, and the first source is opened by the reader thread
        answering an OPEN, which after a failover is the first thing a new worker does
        (docs/failover.md). A spare calls this while it prepares."""
        self._http_pools()

    def open(self, url: str) -> Source:
        scheme = urlsplit(url).scheme
        max_size = min(self.settings.max_blob_size, MAX_BLOB_SIZE)
        if scheme == "file":
            return FileSource(
                unquote(urlsplit(url).path),
                url,
                beneath=getattr(url, "beneath", None),
                fds=self.fds,
                max_size=max_size,
                gate=self.gate,
            )
        if scheme in ("http", "https"):

            def headers() -> dict[str, str]:  # asked per request: a reload reaches it
                lookup = self.settings.headers_for
                return lookup(url) if lookup is not None else {}

            fetch_pool, identity_pool = self._http_pools()
            return HttpSource(
                url,
                pool=fetch_pool,
                identity_pool=identity_pool,
                headers=headers,
                retry=RetryPolicy(total=self.settings.retries),
                timeout=self.settings.timeout,
                max_size=max_size,
                gate=self.gate,
                retries=self.retries,
            )
        raise SourceError(
            f"unsupported URL scheme in {url!r}", transient=False, reason="scheme", url=url
        )

    def close(self) -> None:
        self.fds.close()
        with self._lock:
            if self._pools is not None:
                for pool in self._pools:
                    pool.clear()
