"""``http://`` and ``https://`` sources: HTTP range requests through urllib3.

urllib3 gives connection pooling with keep-alive (one TCP/TLS handshake serves many
chunks), thread safety for the fill workers, TLS with the system's CA store or a
configured CA file, and a small, stable API. The protocol rules are ours and strict,
because a wrong byte written into a cache file would be served as the truth until the
file is culled:

- identity (learnt once per :class:`HttpSource`, i.e. once per OPEN of a blob not in
  use, then pinned): ``HEAD``, size from ``Content-Length``; when that is missing a
  ``Range: bytes=0-0`` GET whose one body byte is all that is ever read. The size must
  be at most :data:`~cachefilesd_py.sources.base.MAX_BLOB_SIZE`, and the origin must
  give a validator that pins the bytes (``sources/validators.py``: a strong ETag, or a
  Last-Modified at least a minute old), else the OPEN is refused;
- every fetch is ``GET`` with ``Range: bytes=a-b`` and the preconditions of the
  pinned identity (``If-Match``, ``If-Unmodified-Since``; 412 means the blob changed);
- the answer must be ``206`` with ``Content-Range: bytes a-b/size`` exactly as asked,
  validators that agree with the identity, no ``Content-Encoding``, and exactly
  ``b-a+1`` body bytes; anything else is an error, the buffer is not reported good,
  and the connection is dropped (never a body read further than asked, never a
  connection with unread bytes back in the pool);
- redirects are not followed (a 3xx is a permanent error): a redirect would take the
  request, and any configured credentials, to a place the ``source`` rule did not name;
- every exchange (connect, headers, body) ends by the caller's deadline
  (``sources/watchdog.py``), and waiting for a free pooled connection too;
- 404/410 → :class:`SourceNotFound`; 5xx, 429, resets, timeouts and short bodies are
  transient and retried with backoff while the deadline allows; other answers are
  permanent. Whatever else goes wrong (a header value that is not Latin-1, a library
  error) is a ``SourceError`` too, never another exception.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import structlog
import urllib3
from urllib3.exceptions import EmptyPoolError
from urllib3.exceptions import HTTPError as Urllib3Error

from cachefilesd_py.counters import LabelledCounts
from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources import validators as v
from cachefilesd_py.sources.base import BlobIdentity, admitted, check_blob_size
from cachefilesd_py.sources.policy import Deadline, RetryPolicy
from cachefilesd_py.sources.watchdog import WATCHDOG, Exchange

log = structlog.get_logger("sources.http")

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
#: a body is read in pieces of at most this much (urllib3 copies through a temporary
#: of the piece's size, so this bounds the extra memory of one fetch)
READ_PIECE = 256 * 1024
#: errors a library call may raise that are about the exchange, not about our code
_EXCHANGE_ERRORS = (Urllib3Error, OSError, http.client.HTTPException, ValueError)
#: request headers the protocol sets; configured headers of these names are dropped
PROTOCOL_HEADERS = frozenset(
    {
        "range",
        "if-match",
        "if-none-match",
        "if-unmodified-since",
        "if-modified-since",
        "if-range",
        "accept-encoding",
        "te",
        "connection",
        "host",
        "content-length",
        "transfer-encoding",
    }
)

T = TypeVar("T")


def origin_of(url: str) -> str:
    """``scheme://host:port`` of an HTTP(S) URL, the default port written out."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def header_problem(headers: dict[str, str]) -> str | None:
    """Why these request headers cannot be sent as they are (None: they can)."""
    for name, value in headers.items():
        if not name or not name.isascii() or any(c in name for c in ":\r\n\0 \t"):
            return f"header name {name!r} is not a token"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"header {name} has characters outside Latin-1"
        if any(c in value for c in "\r\n\0"):
            return f"header {name} has CR, LF or NUL"
    return None


class HttpSource:
    """One opening of one HTTP(S) blob (see ``sources/base.py``)."""

    def __init__(
        self,
        url: str,
        *,
        pool: urllib3.PoolManager,
        identity_pool: urllib3.PoolManager | None = None,
        headers: dict[str, str] | Callable[[], dict[str, str]] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        max_size: int | None = None,
        gate: threading.BoundedSemaphore | None = None,
        retries: LabelledCounts | None = None,
    ) -> None:
        self.url = url
        self.gate = gate
        #: retries taken, by source label (the factory's counter, read by the daemon)
        self.retries = retries
        self.pool = pool
        self.identity_pool = identity_pool or pool
        #: the configured headers: a fixed dict, or a callable asked at every request
        #: (``config/load.py`` Credentials: a credentials reload reaches open blobs)
        if callable(headers):
            self._headers_of = headers
        else:
            fixed = dict(headers or {})
            self._headers_of = lambda: fixed
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.max_size = max_size
        self.origin = origin_of(url)
        #: the ``source`` rule's label for metrics (``sources/resolve.py``)
        self.label: str = getattr(url, "label", None) or self.origin
        self._identity: BlobIdentity | None = None
        self._identity_lock = threading.Lock()

    @property
    def headers(self) -> dict[str, str]:
        """The configured headers now."""
        return self._headers_of()

    # -- helpers -----------------------------------------------------------------------

    def _headers(self, ours: dict[str, str] | None = None) -> dict[str, str]:
        """The configured headers, less any that would override the protocol's own
        (``Range``, preconditions, encodings), plus ``ours``."""
        headers = {k: val for k, val in self.headers.items() if k.lower() not in PROTOCOL_HEADERS}
        headers.update(ours or {})
        return headers

    def _timeout(self, deadline: Deadline) -> urllib3.Timeout:
        left = max(0.01, min(self.timeout, deadline.remaining()))
        return urllib3.Timeout(connect=left, read=left)

    def _error(self, message: str, *, transient: bool, reason: str) -> SourceError:
        return SourceError(
            f"{self.url}: {message}", transient=transient, reason=reason, url=self.url
        )

    def _status_error(self, status: int) -> SourceError:
        if status in (404, 410):
            return SourceNotFound(f"{self.url}: HTTP {status}", url=self.url)
        if status == 412:
            return IdentityChanged(
                f"{self.url}: the blob changed upstream (HTTP 412 on its validators)",
                url=self.url,
            )
        if 300 <= status < 400:
            return self._error(
                f"HTTP {status}: redirects are not followed", transient=False, reason="redirect"
            )
        return self._error(
            f"HTTP {status}", transient=status in TRANSIENT_STATUS, reason=f"http-{status}"
        )

    def _exchange_error(self, what: str, exc: BaseException, ex: Exchange) -> SourceError:
        if ex.expired:
            return self._error(f"{what}: deadline passed", transient=True, reason="deadline")
        if isinstance(exc, EmptyPoolError):
            return self._error(
                f"{what}: no free connection to {self.origin} before the deadline",
                transient=True,
                reason="pool-wait",
            )
        if isinstance(exc, UnicodeError | ValueError) and not isinstance(exc, Urllib3Error):
            return self._error(f"{what}: {exc}", transient=False, reason="bad-request")
        return self._error(f"{what}: {exc}", transient=True, reason="connect")

    def _request(
        self,
        pool: urllib3.PoolManager,
        method: str,
        headers: dict[str, str],
        deadline: Deadline,
        ex: Exchange,
    ) -> urllib3.BaseHTTPResponse:
        try:
            return pool.request(
                method,
                self.url,
                headers=headers,
                retries=False,
                redirect=False,
                timeout=self._timeout(deadline),
                pool_timeout=max(0.001, deadline.remaining()),
                preload_content=False,
                decode_content=False,
            )
        except _EXCHANGE_ERRORS as exc:
            raise self._exchange_error(f"{method} failed", exc, ex) from exc

    def _with_retries(self, what: str, deadline: Deadline, attempt: Callable[[], T]) -> T:
        policy = self.retry
        while True:
            if deadline.expired():
                raise self._error(f"{what}: deadline passed", transient=True, reason="deadline")
            try:
                return attempt()
            except SourceError as exc:
                policy = policy.next(exc)  # re-raises when permanent or exhausted
                pause = policy.sleep_for()
                if deadline.remaining() <= pause:
                    raise
                if self.retries is not None:
                    self.retries.add(self.label)
                log.info(
                    "http.retry",
                    url=self.url,
                    what=what,
                    attempt=policy.attempt,
                    reason=exc.reason,
                    error=str(exc),
                )
                time.sleep(pause)

    def _guarded(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; anything but a ``SourceError`` becomes one (reason ``unexpected``,
        logged with its traceback: it is a bug to fix, but never a crash)."""
        try:
            return fn()
        except SourceError:
            raise
        except Exception as exc:
            log.exception("http.unexpected", url=self.url, what=what)
            raise self._error(
                f"{what}: unexpected {type(exc).__name__}: {exc}",
                transient=False,
                reason="unexpected",
            ) from exc

    # -- identity ----------------------------------------------------------------------

    def identity(self, deadline: Deadline) -> BlobIdentity:
        """The pinned identity; learnt from the origin at the first call."""
        with self._identity_lock:  # two callers never pin two different versions
            if self._identity is None:
                self._identity = self._guarded("identity", lambda: self._learn_identity(deadline))
            return self._identity

    def _learn_identity(self, deadline: Deadline) -> BlobIdentity:
        problem = header_problem(self.headers)
        if problem is not None:
            raise self._error(problem, transient=False, reason="bad-header")
        return self._with_retries("identity", deadline, lambda: self._identity_once(deadline))

    def _identity_once(self, deadline: Deadline) -> BlobIdentity:
        with WATCHDOG.exchange(deadline) as ex:
            resp = self._request(self.identity_pool, "HEAD", self._headers(), deadline, ex)
            try:
                status, headers = resp.status, resp.headers
                if status == 200:
                    resp.drain_conn()  # no body: marks the answer done, the connection idle
            finally:
                if status != 200:
                    resp.close()
                resp.release_conn()  # before any other request: the pool may be small
            if status != 200:
                raise self._status_error(status)
            length = v.parse_content_length(headers.get("Content-Length"))
            if length is not None:
                return self._make_identity(length, headers)
            return self._identity_by_range(deadline, ex)

    def _identity_by_range(self, deadline: Deadline, ex: Exchange) -> BlobIdentity:
        resp = self._request(
            self.identity_pool, "GET", self._headers({"Range": "bytes=0-0"}), deadline, ex
        )
        ok = False
        try:
            if resp.status == 200:
                raise self._error(
                    "no Content-Length in HEAD and the server ignores Range requests",
                    transient=False,
                    reason="no-range",
                )
            if resp.status != 206:
                raise self._status_error(resp.status)
            cr = v.parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[:2] != (0, 0):
                raise self._error(
                    f"no usable Content-Range ({resp.headers.get('Content-Range')!r})",
                    transient=False,
                    reason="bad-range",
                )
            self._read_body(resp, memoryview(bytearray(1)), ex)
            ident = self._make_identity(cr[2], resp.headers)
            ok = True
            return ident
        finally:
            if not ok:
                resp.close()
            resp.release_conn()

    def _make_identity(self, size: int, headers: urllib3.HTTPHeaderDict) -> BlobIdentity:
        check_blob_size(size, self.url)
        if self.max_size is not None and size > self.max_size:
            raise self._error(
                f"blob size {size} above the configured limit {self.max_size}",
                transient=False,
                reason="too-large",
            )
        etag = v.parse_etag(headers.get("ETag"))
        last_modified = v.parse_http_date(headers.get("Last-Modified"))
        date = v.parse_http_date(headers.get("Date"))
        if date is None:
            date = int(time.time())
        problem = v.identity_problem(etag, last_modified, date)
        if problem is not None:
            raise self._error(problem, transient=False, reason="no-validator")
        return BlobIdentity(size, etag, self.url, last_modified)

    # -- fetch -------------------------------------------------------------------------

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None:
        ident = self.identity(deadline)
        if offset < 0 or offset + len(buf) > ident.size:
            raise self._error(
                f"range {offset}+{len(buf)} past the end ({ident.size})",
                transient=False,
                reason="range",
            )
        if not len(buf):
            return
        with admitted(self.gate, deadline, self.url):
            self._guarded(
                "fetch",
                lambda: self._with_retries(
                    "fetch", deadline, lambda: self._fetch_once(ident, offset, buf, deadline)
                ),
            )

    def _fetch_once(
        self, ident: BlobIdentity, offset: int, buf: memoryview, deadline: Deadline
    ) -> None:
        last = offset + len(buf) - 1
        headers = self._headers({"Range": f"bytes={offset}-{last}", **v.conditions(ident)})
        with WATCHDOG.exchange(deadline) as ex:
            resp = self._request(self.pool, "GET", headers, deadline, ex)
            ok = False
            try:
                self._check_partial(resp, ident, offset, last)
                self._read_body(resp, buf, ex)
                ok = True
            finally:
                if not ok:
                    resp.close()  # never read further than asked, never reuse
                resp.release_conn()

    def _check_partial(
        self, resp: urllib3.BaseHTTPResponse, ident: BlobIdentity, offset: int, last: int
    ) -> None:
        if resp.status != 206:
            if resp.status == 200:
                raise self._error("200 for a range request", transient=False, reason="not-partial")
            raise self._status_error(resp.status)
        expected = f"bytes {offset}-{last}/{ident.size}"
        got = resp.headers.get("Content-Range", "")
        if got != expected:
            raise self._error(
                f"Content-Range {got[:100]!r}, expected {expected!r}",
                transient=True,
                reason="bad-content-range",
            )
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise self._error(
                f"Content-Encoding {encoding[:40]!r} was not asked for",
                transient=False,
                reason="encoded",
            )
        coding = resp.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise self._error(
                f"Transfer-Encoding {coding[:40]!r} is not chunked",
                transient=False,
                reason="encoded",
            )
        problem = v.answer_problem(ident, resp.headers)
        if problem is not None:
            raise IdentityChanged(f"{self.url}: {problem}", url=self.url)
        length = resp.headers.get("Content-Length")
        if length is not None and v.parse_content_length(length) != last - offset + 1:
            raise self._error(
                f"Content-Length {length[:40]!r} for {last - offset + 1} bytes",
                transient=True,
                reason="bad-length",
            )

    def _read_body(self, resp: urllib3.BaseHTTPResponse, buf: memoryview, ex: Exchange) -> None:
        done = 0
        try:
            while done < len(buf):
                n = resp.readinto(buf[done : done + READ_PIECE])
                if not n:
                    break
                done += n
            extra = resp.read(1) if done == len(buf) else b""
        except _EXCHANGE_ERRORS as exc:
            if ex.expired:
                raise self._error(
                    f"deadline passed after {done} of {len(buf)} body bytes",
                    transient=True,
                    reason="deadline",
                ) from exc
            raise self._error(
                f"body broken after {done} bytes: {exc}", transient=True, reason="body"
            ) from exc
        if ex.expired and done != len(buf):
            raise self._error(
                f"deadline passed after {done} of {len(buf)} body bytes",
                transient=True,
                reason="deadline",
            )
        if done != len(buf):
            raise self._error(
                f"short body: {done} of {len(buf)} bytes", transient=True, reason="short-body"
            )
        if extra:
            raise self._error("body longer than the range", transient=True, reason="long-body")

    def close(self) -> None:
        """The pools are shared and closed by their owner."""
