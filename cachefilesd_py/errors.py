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
