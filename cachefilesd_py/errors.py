"""The project's one error tree.

Each class says what went wrong *and* what follows from it: ``exit_code`` is the process
exit status when the error ends the daemon (the cachefilesd C meanings: 1 = OS error,
2 = configuration or command-line error, 3 = internal error), ``kernel_errno`` is the
errno the kernel is told (a negative ``copen``, or a READ completed unfilled) when the
error ends one request.

Errors are translated once, at the boundary that sees the foreign failure: ``OSError``
and HTTP failures become :class:`SourceError` inside ``sources/``; malformed bytes from
``/dev/cachefiles`` become :class:`KernelProtocolError` inside ``frontends/ondemand/wire``.
"""

from __future__ import annotations

import errno


class CachefilesdError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code: int = 3
    kernel_errno: int = errno.EIO


class ConfigError(CachefilesdError):
    """The configuration (file or command line) breaks a rule.

    ``str(err)`` reads ``file:line: rule``, the form every config error is printed in.
    """

    exit_code = 2

    def __init__(self, rule: str, file: str | None = None, line: int | None = None) -> None:
        self.rule = rule
        self.file = file
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.file is not None and self.line is not None:
            return f"{self.file}:{self.line}: {self.rule}"
        if self.file is not None:
            return f"{self.file}: {self.rule}"
        return self.rule


class KernelProtocolError(CachefilesdError):
    """The kernel sent bytes that do not form a valid message (short, wrong ``len``,
    unknown opcode, oversized keys). The message is logged and dropped; the daemon
    goes on."""

    exit_code = 3


class SourceError(CachefilesdError):
    """Fetching bytes of a blob failed.

    ``transient`` errors (5xx, resets, timeouts, short bodies) may be retried;
    permanent ones (404, identity changed, bad URL) may not. ``reason`` is a short
    machine-readable tag for logs and metrics.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        reason: str,
        kernel_errno: int = errno.EIO,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = reason
        self.kernel_errno = kernel_errno
        self.url = url


class SourceNotFound(SourceError):
    """The blob does not exist at its source (404, missing file): OPEN is refused with
    ENOENT and the mount fails cleanly."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(
            message, transient=False, reason="not-found", kernel_errno=errno.ENOENT, url=url
        )


class IdentityChanged(SourceError):
    """The blob's length or ETag changed upstream while cached: mixing versions would
    corrupt the file, so the READ fails (EIO) and it is logged loudly."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(
            message, transient=False, reason="identity-changed", kernel_errno=errno.EIO, url=url
        )


class PresenceCorrupt(CachefilesdError):
    """A presence sidecar is unreadable, fails its checksum, or is not bound to the
    cache file it claims. Never fatal: the caller treats the blob as absent (a miss)."""

    exit_code = 3


#: the kinds :func:`error_kind` sorts failures into: a small fixed set, so that
#: "errors by kind" stays a handful of metric series whatever origins answer
ERROR_KINDS = (
    "timeout",
    "connection",
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "not_found",
    "validator_mismatch",
    "short_body",
    "protocol",
    "source_io",
    "cache_io",
    "refused",
    "other",
)

_KIND_OF_REASON = {
    # the deadline passed, or no slot/connection came free before it
    "deadline": "timeout",
    "pool-wait": "timeout",
    "busy": "timeout",
    # the connection failed or broke mid-body
    "connect": "connection",
    "body": "connection",
    "redirect": "http_3xx",
    "not-found": "not_found",
    # the origin's validators no longer match the pinned identity (412, another ETag)
    "identity-changed": "validator_mismatch",
    # fewer bytes than asked (HTTP body, or a file that shrank)
    "short-body": "short_body",
    "short-read": "short_body",
    # the origin broke the range protocol
    "long-body": "protocol",
    "bad-length": "protocol",
    "bad-content-range": "protocol",
    "bad-range": "protocol",
    "not-partial": "protocol",
    "no-range": "protocol",
    "encoded": "protocol",
    "no-validator": "protocol",
    "bad-header": "protocol",
    # a file source could not be opened or read
    "open": "source_io",
    "read": "source_io",
    "not-a-file": "source_io",
    # refused by our own rules before or instead of asking
    "outside-source": "refused",
    "scheme": "refused",
    "too-large": "refused",
    "range": "refused",
    "bad-request": "refused",
}


def error_kind(exc: BaseException) -> str:
    """The kind (one of :data:`ERROR_KINDS`) of a failure of a fetch or an OPEN: a
    :class:`SourceError` by its ``reason`` (``http-NNN`` by status class), an
    ``OSError`` that is not one as ``cache_io`` (the sources turn their own ``OSError``
    into ``SourceError``, so a bare one came from writing the cache file)."""
    if isinstance(exc, SourceError):
        reason = exc.reason
        if reason.startswith("http-") and reason[5:6] in ("3", "4", "5"):
            return f"http_{reason[5]}xx"
        return _KIND_OF_REASON.get(reason, "other")
    if isinstance(exc, OSError):
        return "cache_io"
    return "other"
