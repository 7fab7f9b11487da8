"""``http://`` and ``https://`` sources: HTTP range requests through urllib3.

urllib3 gives connection pooling with keep-alive (one TCP/TLS handshake serves many
chunks), thread safety for the fill workers, TLS with the system's CA store or a
configured CA file, and ``readinto`` of response bodies straight into our page-aligned
buffers. The protocol rules are ours and strict, because a wrong byte written into a
cache file would be served as the truth until the file is culled:

- identity: ``HEAD`` (size from ``Content-Length``, ``ETag``), or a ``Range: bytes=0-0``
  GET when HEAD gives no length;
- every fetch is ``GET`` with ``Range: bytes=a-b`` and, when the blob has an ETag,
  ``If-Match`` (a 412 means the blob changed upstream);
- the answer must be ``206`` with ``Content-Range: bytes a-b/size`` exactly as asked,
  the same ETag, and exactly ``b-a+1`` body bytes; anything else is an error, and the
  buffer is not reported good;
- 404/410 → :class:`SourceNotFound`; 5xx, 429, resets, timeouts and short bodies are
  transient and retried with backoff while the deadline allows; other answers are
  permanent.
"""

from __future__ import annotations

import re
import time

import structlog
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources.base import BlobIdentity
from cachefilesd_py.sources.policy import Deadline, RetryPolicy

log = structlog.get_logger("sources.http")

CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HttpSource:
    def __init__(
        self,
        url: str,
        *,
        pool: urllib3.PoolManager,
        headers: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.pool = pool
        self.headers = dict(headers or {})
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._identity: BlobIdentity | None = None

    @property
    def origin(self) -> str:
        """``scheme://host:port`` (the default port written out)."""
        parsed = urllib3.util.parse_url(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return f"{parsed.scheme}://{parsed.host}:{port}"

    # -- helpers -----------------------------------------------------------------------

    def _timeout(self, deadline: Deadline) -> urllib3.Timeout:
        left = max(0.05, min(self.timeout, deadline.remaining()))
        return urllib3.Timeout(connect=left, read=left)

    def _error(self, message: str, *, transient: bool, reason: str) -> SourceError:
        return SourceError(
            f"{self.url}: {message}", transient=transient, reason=reason, url=self.url
        )

    def _status_error(self, status: int) -> SourceError:
        if status in (404, 410):
            return SourceNotFound(f"{self.url}: HTTP {status}", url=self.url)
        if status == 412:
            return IdentityChanged(f"{self.url}: ETag no longer matches (HTTP 412)", url=self.url)
        return self._error(
            f"HTTP {status}", transient=status in TRANSIENT_STATUS, reason=f"http-{status}"
        )

    def _with_retries(self, what: str, deadline: Deadline, attempt):  # type: ignore[no-untyped-def]
        policy = self.retry
        while True:
            try:
                return attempt()
            except SourceError as exc:
                policy = policy.next(exc)  # re-raises when permanent or exhausted
                pause = policy.sleep_for()
                if deadline.remaining() <= pause:
                    raise
                log.info(
                    "http.retry",
                    url=self.url,
                    what=what,
                    attempt=policy.attempt,
                    reason=exc.reason,
                    error=str(exc),
                )
                time.sleep(pause)

    # -- identity ----------------------------------------------------------------------

    def identity(self, deadline: Deadline) -> BlobIdentity:
        if self._identity is None:
            self._identity = self._with_retries(
                "identity", deadline, lambda: self._identity_once(deadline)
            )
        return self._identity

    def _identity_once(self, deadline: Deadline) -> BlobIdentity:
        try:
            resp = self.pool.request(
                "HEAD",
                self.url,
                headers=self.headers,
                retries=False,
                timeout=self._timeout(deadline),
            )
        except Urllib3Error as exc:
            raise self._error(f"HEAD failed: {exc}", transient=True, reason="connect") from exc
        if resp.status != 200:
            raise self._status_error(resp.status)
        etag = resp.headers.get("ETag")
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit():
            return BlobIdentity(int(length), etag, self.url)
        return self._identity_by_range(deadline)

    def _identity_by_range(self, deadline: Deadline) -> BlobIdentity:
        headers = dict(self.headers, Range="bytes=0-0")
        try:
            resp = self.pool.request(
                "GET", self.url, headers=headers, retries=False, timeout=self._timeout(deadline)
            )
        except Urllib3Error as exc:
            raise self._error(f"GET failed: {exc}", transient=True, reason="connect") from exc
        if resp.status != 206:
            raise (
                self._status_error(resp.status)
                if resp.status != 200
                else self._error(
                    "server ignores Range requests", transient=False, reason="no-range"
                )
            )
        m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m:
            raise self._error("no usable Content-Range", transient=False, reason="bad-range")
        return BlobIdentity(int(m.group(3)), resp.headers.get("ETag"), self.url)

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
        self._with_retries(
            "fetch", deadline, lambda: self._fetch_once(ident, offset, buf, deadline)
        )

    def _fetch_once(
        self, ident: BlobIdentity, offset: int, buf: memoryview, deadline: Deadline
    ) -> None:
        last = offset + len(buf) - 1
        headers = dict(self.headers, Range=f"bytes={offset}-{last}")
        if ident.etag:
            headers["If-Match"] = ident.etag
        try:
            resp = self.pool.request(
                "GET",
                self.url,
                headers=headers,
                retries=False,
                timeout=self._timeout(deadline),
                preload_content=False,
            )
        except Urllib3Error as exc:
            raise self._error(f"GET failed: {exc}", transient=True, reason="connect") from exc
        try:
            if resp.status != 206:
                raise (
                    self._status_error(resp.status)
                    if resp.status != 200
                    else self._error(
                        "200 for a range request", transient=False, reason="not-partial"
                    )
                )
            expected = f"bytes {offset}-{last}/{ident.size}"
            got = resp.headers.get("Content-Range", "")
            if got != expected:
                raise self._error(
                    f"Content-Range {got!r}, expected {expected!r}",
                    transient=True,
                    reason="bad-content-range",
                )
            etag = resp.headers.get("ETag")
            if ident.etag and etag and etag != ident.etag:
                raise IdentityChanged(f"{self.url}: ETag {etag} != {ident.etag}", url=self.url)
            self._read_body(resp, buf)
        finally:
            resp.release_conn()

    def _read_body(self, resp: urllib3.BaseHTTPResponse, buf: memoryview) -> None:
        done = 0
        try:
            while done < len(buf):
                n = resp.readinto(buf[done:])
                if not n:
                    break
                done += n
            extra = resp.read(1) if done == len(buf) else b""
        except (Urllib3Error, OSError) as exc:
            raise self._error(
                f"body broken after {done} bytes: {exc}", transient=True, reason="body"
            ) from exc
        if done != len(buf):
            raise self._error(
                f"short body: {done} of {len(buf)} bytes", transient=True, reason="short-body"
            )
        if extra:
            raise self._error("body longer than the range", transient=True, reason="long-body")

    def close(self) -> None:
        """The pool is shared and closed by its owner."""
