"""Turning a URL into a :class:`Source`, with one shared HTTP connection pool."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import urllib3

from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.base import Source
from cachefilesd_py.sources.file import FileSource
from cachefilesd_py.sources.http import HttpSource
from cachefilesd_py.sources.policy import RetryPolicy


@dataclass(frozen=True)
class SourceSettings:
    ca_file: str | None = None
    headers_for: Callable[[str], dict[str, str]] | None = None
    timeout: float = 30.0
    retries: int = 3
    pool_size: int = 8


class SourceFactory:
    """Opens sources by URL; one :class:`Source` per URL, one pool for all HTTP."""

    def __init__(self, settings: SourceSettings | None = None) -> None:
        self.settings = settings or SourceSettings()
        self._sources: dict[str, Source] = {}
        self._lock = threading.Lock()
        self._pool: urllib3.PoolManager | None = None

    def _http_pool(self) -> urllib3.PoolManager:
        if self._pool is None:
            ctx = ssl.create_default_context(cafile=self.settings.ca_file)
            self._pool = urllib3.PoolManager(
                num_pools=32, maxsize=self.settings.pool_size, block=False, ssl_context=ctx
            )
        return self._pool

    def open(self, url: str) -> Source:
        with self._lock:
            source = self._sources.get(url)
            if source is not None:
                return source
            scheme = urlsplit(url).scheme
            if scheme == "file":
                source = FileSource(unquote(urlsplit(url).path), url)
            elif scheme in ("http", "https"):
                headers = self.settings.headers_for(url) if self.settings.headers_for else {}
                source = HttpSource(
                    url,
                    pool=self._http_pool(),
                    headers=headers,
                    retry=RetryPolicy(total=self.settings.retries),
                    timeout=self.settings.timeout,
                )
            else:
                raise SourceError(
                    f"unsupported URL scheme in {url!r}", transient=False, reason="scheme", url=url
                )
            self._sources[url] = source
            return source

    def close(self) -> None:
        with self._lock:
            for source in self._sources.values():
                source.close()
            self._sources.clear()
            if self._pool is not None:
                self._pool.clear()
