"""The fanotify wire format: pure decoding of events, pure encoding of responses.

Nothing here does I/O. :func:`decode_events` turns the bytes of one ``read()`` of a
fanotify group into :class:`Event` values or raises :class:`MalformedEvent`;
:func:`allow` and :func:`deny` build the ``struct fanotify_response`` the daemon
``write()``\\ s back; :func:`encode_event` builds event bytes (for fakes and tests).
docs/protocol-fanotify.md tells the whole event flow.

Layouts (``include/uapi/linux/fanotify.h``, host byte order)::

    struct fanotify_event_metadata {        /* 24 bytes, FAN_EVENT_METADATA_LEN */
            __u32 event_len;                /* this record + its info records */
            __u8 vers;                      /* FANOTIFY_METADATA_VERSION, 3 */
            __u8 reserved;
            __u16 metadata_len;             /* 24 */
            __aligned_u64 mask;
            __s32 fd;                       /* FAN_NOFD (-1): no fd */
            __s32 pid;
    };
    struct fanotify_event_info_header {     /* starts every info record */
            __u8 info_type;
            __u8 pad;
            __u16 len;                      /* the whole record, header included */
    };
    struct fanotify_event_info_range {      /* FAN_EVENT_INFO_TYPE_RANGE (6), 24 bytes */
            struct fanotify_event_info_header hdr;
            __u32 pad;
            __u64 offset;
            __u64 count;
    };
    struct fanotify_response {
            __s32 fd;
            __u32 response;
    };
    #define FAN_ALLOW       0x01
    #define FAN_DENY        0x02
    #define FAN_ERRNO_BITS  8
    #define FAN_ERRNO_SHIFT (32 - FAN_ERRNO_BITS)
    #define FAN_ERRNO_MASK  ((1 << FAN_ERRNO_BITS) - 1)
    #define FAN_DENY_ERRNO(err) \\
            (FAN_DENY | ((((__u32)(err)) & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT))

What the kernel guarantees and what is checked here:

- ``read()`` returns whole events only, packed one after another; each record's
  ``event_len`` covers its metadata and its info records. A record that claims more
  bytes than are left, less than its own metadata, or a metadata version other than
  3, is malformed: nothing after it can be trusted, so decoding stops there.
- Info records follow the metadata, each starting with its header; ``len`` must be at
  least the header and must fit in the event. Unknown types are skipped by ``len``
  (their type is kept in :attr:`Event.skipped_info` for diagnostics). A range record
  must be exactly 24 bytes, and an event has at most one.
- A pre-content event (``FAN_PRE_ACCESS``) on a regular file carries a range record:
  the pages the reader is about to access (the kernel rounds the offset down and the
  end up to the page size, so a 17-byte read at 409605 reports 409600 + 4096). ``count``
  may be 0 (a truncate reports its new length) and ``offset + count`` may exceed the
  file size (a read past EOF). Without a range record the access has no known range
  (the kernel sends that for ``readdir`` of a marked directory): :attr:`Event.range`
  is None.
- Every event with ``fd >= 0`` holds an fd the kernel installed in the reader, and
  every *permission* event must be answered exactly once, by that fd number. So a
  malformed record still reports the fd of the event it belongs to when its metadata
  was readable (:attr:`MalformedEvent.fd`), and the events decoded before it
  (:attr:`MalformedEvent.events`): the caller answers and closes those.
- ``FAN_DENY_ERRNO(e)`` (Linux 6.14+, pre-content groups only) makes the reader's
  call fail with ``e``; the kernel accepts only the errnos in :data:`DENY_ERRNOS` and
  fails the ``write()`` with EINVAL for any other (the event then stays pending).
  ``FAN_DENY`` alone gives EPERM on every kernel.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.kernel.fanotify import (
    FAN_ACCESS_PERM,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    FAN_Q_OVERFLOW,
)

METADATA: Final = struct.Struct("=IBBHQii")
assert METADATA.size == 24
INFO_HEADER: Final = struct.Struct("=BBH")
assert INFO_HEADER.size == 4
RANGE_INFO: Final = struct.Struct("=BBHIQQ")
assert RANGE_INFO.size == 24
RESPONSE: Final = struct.Struct("=iI")
assert RESPONSE.size == 8

FANOTIFY_METADATA_VERSION: Final = 3
FAN_EVENT_INFO_TYPE_PIDFD: Final = 4
FAN_EVENT_INFO_TYPE_ERROR: Final = 5
FAN_EVENT_INFO_TYPE_RANGE: Final = 6
FAN_NOFD: Final = -1
#: the info types the kernel writes before a range record (file ids 1-3, 10, 12, then
#: pidfd 4, error 5); the mount record (7) comes after it
INFO_BEFORE_RANGE: Final = frozenset({1, 2, 3, 4, 5, 10, 12})

FAN_ALLOW: Final = 0x01
FAN_DENY: Final = 0x02
FAN_ERRNO_SHIFT: Final = 24
FAN_ERRNO_MASK: Final = 0xFF

#: the events that wait for an answer (``FANOTIFY_PERM_EVENTS`` of the kernel)
PERMISSION_EVENTS: Final = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS

#: the errnos ``FAN_DENY_ERRNO`` may carry (Linux 7.3, fs/notify/fanotify/fanotify_user.c,
#: "values expected on open(2)/read(2)/write(2) of regular files")
DENY_ERRNOS: Final = frozenset(
    {
        errno.EPERM,
        errno.EIO,
        errno.EBUSY,
        errno.ETXTBSY,
        errno.EAGAIN,
        errno.ENOSPC,
        errno.EDQUOT,
    }
)


@dataclass(frozen=True, slots=True)
class FileRange:
    """The bytes a pre-content event is about: ``[offset, offset + count)``."""

    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded event. ``fd`` is the kernel's fd for the file (FAN_NOFD: none; a
    negative errno with ``FAN_REPORT_FD_ERROR``); ``pid`` the task that caused it."""

    mask: int
    fd: int
    pid: int
    range: FileRange | None = None
    #: info record types that were skipped (unknown to this decoder), in order
    skipped_info: tuple[int, ...] = ()

    @property
    def is_permission(self) -> bool:
        """The kernel waits for an answer to this event (if its fd is valid)."""
        return bool(self.mask & PERMISSION_EVENTS)

    @property
    def needs_response(self) -> bool:
        """A permission event with a valid fd. (With an fd error the kernel has already
        denied it; there is nothing to answer.)"""
        return self.is_permission and self.fd >= 0

    @property
    def is_overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


class MalformedEvent(KernelProtocolError):
    """Bytes from the group that are not a valid event record.

    ``events``: the events decoded before the bad record (the caller still owns their
    fds and answers). ``fd``: the bad record's fd when its metadata was readable (it too
    must be answered and closed), else None. ``offset``: where the bad record starts."""

    def __init__(
        self, why: str, *, offset: int, fd: int | None = None, events: tuple[Event, ...] = ()
    ) -> None:
        super().__init__(f"malformed fanotify event at byte {offset}: {why}")
        self.offset = offset
        self.fd = fd
        self.events = events


def _decode_info(
    buf: memoryview, start: int, end: int, fail: _Fail
) -> tuple[FileRange | None, tuple[int, ...]]:
    rng: FileRange | None = None
    skipped: list[int] = []
    pos = start
    while pos < end:
        if end - pos < INFO_HEADER.size:
            raise fail(f"{end - pos} stray bytes after the info records")
        info_type, _pad, length = INFO_HEADER.unpack_from(buf, pos)
        if length < INFO_HEADER.size or length > end - pos:
            raise fail(f"info record type {info_type} has len {length}, {end - pos} left")
        if info_type == FAN_EVENT_INFO_TYPE_RANGE:
            if length != RANGE_INFO.size:
                raise fail(f"range info record of {length} bytes, expected {RANGE_INFO.size}")
            if rng is not None:
                raise fail("two range info records in one event")
            _t, _p, _l, _pad2, offset, count = RANGE_INFO.unpack_from(buf, pos)
            rng = FileRange(offset, count)
        else:
            skipped.append(info_type)
        pos += length
    return rng, tuple(skipped)


class _Fail:
    """Builds the MalformedEvent for the record being decoded."""

    def __init__(self, offset: int, fd: int | None, events: list[Event]) -> None:
        self.offset, self.fd, self.events = offset, fd, events

    def __call__(self, why: str) -> MalformedEvent:
        return MalformedEvent(why, offset=self.offset, fd=self.fd, events=tuple(self.events))


def decode_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Every event in the bytes of one ``read()``, in order (see the module docstring
    for what is checked). Raises :class:`MalformedEvent` at the first bad record."""
    buf = memoryview(data).cast("B")
    events: list[Event] = []
    pos = 0
    while pos < len(buf):
        left = len(buf) - pos
        if left < METADATA.size:
            raise _Fail(pos, None, events)(f"{left} bytes, shorter than the event metadata")
        event_len, vers, _res, metadata_len, mask, fd, pid = METADATA.unpack_from(buf, pos)
        if vers != FANOTIFY_METADATA_VERSION:
            # another layout: not even the fd field can be trusted
            raise _Fail(pos, None, events)(
                f"metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}"
            )
        fail = _Fail(pos, fd if fd >= 0 else None, events)
        if metadata_len < METADATA.size:
            raise fail(f"metadata_len {metadata_len} < {METADATA.size}")
        if event_len < metadata_len or event_len > left:
            raise fail(f"event_len {event_len} (metadata_len {metadata_len}, {left} bytes left)")
        rng, skipped = _decode_info(buf, pos + metadata_len, pos + event_len, fail)
        events.append(Event(mask, fd, pid, rng, skipped))
        pos += event_len
    return events


# -- encoding ----------------------------------------------------------------------------


def encode_response(fd: int, response: int) -> bytes:
    """``struct fanotify_response`` for the event whose fd is ``fd``."""
    if fd < 0:
        raise ValueError(f"a response names the event's fd, got {fd}")
    return RESPONSE.pack(fd, response)


def allow(fd: int) -> bytes:
    """``FAN_ALLOW``: the access proceeds (and reads whatever the file holds)."""
    return encode_response(fd, FAN_ALLOW)


def deny(fd: int, err: int = errno.EPERM) -> bytes:
    """Deny the access; the reader's call fails with ``err``.

    ``EPERM`` is encoded as plain ``FAN_DENY``, which every kernel accepts; any other
    errno as ``FAN_DENY_ERRNO(err)`` (6.14+, pre-content groups), and only the errnos the
    kernel allows (:data:`DENY_ERRNOS`), so that the write cannot fail with EINVAL and
    leave the event pending."""
    if err not in DENY_ERRNOS:
        allowed = ", ".join(sorted(errno.errorcode[e] for e in DENY_ERRNOS))
        raise ValueError(f"the kernel accepts FAN_DENY_ERRNO only for {allowed}, not {err}")
    if err == errno.EPERM:
        return encode_response(fd, FAN_DENY)
    return encode_response(fd, FAN_DENY | (err & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)


#: ``struct fanotify_response_info_audit_rule``: header (type 1, pad, len 16), rule
#: number, subject and object trust
AUDIT_RULE_INFO: Final = struct.Struct("=BBHIII")
assert AUDIT_RULE_INFO.size == 16
FAN_INFO: Final = 0x20
FAN_RESPONSE_INFO_AUDIT_RULE: Final = 1


def deny_errno_probe(err: int) -> bytes:
    """A response that asks the kernel whether it accepts ``FAN_DENY_ERRNO(err)``
    without answering any event: fd ``FAN_NOFD`` with ``FAN_INFO`` and an (empty)
    audit-rule info record. A kernel that accepts the errno returns from the
    ``write()`` (nothing else happens); one that does not, or predates
    ``FAN_DENY_ERRNO`` (< 6.14: the errno bits are invalid) fails it with EINVAL."""
    if not 0 < err <= FAN_ERRNO_MASK:
        raise ValueError(f"an errno fits in 8 bits: {err}")
    response = FAN_DENY | FAN_INFO | err << FAN_ERRNO_SHIFT
    return RESPONSE.pack(FAN_NOFD, response) + AUDIT_RULE_INFO.pack(
        FAN_RESPONSE_INFO_AUDIT_RULE, 0, AUDIT_RULE_INFO.size, 0, 0, 0
    )


def decode_response(data: bytes) -> tuple[int, int, int]:
    """``(fd, FAN_ALLOW or FAN_DENY, errno or 0)`` of an encoded response (for fakes)."""
    if len(data) != RESPONSE.size:
        raise KernelProtocolError(f"a fanotify response is {RESPONSE.size} bytes, got {len(data)}")
    fd, response = RESPONSE.unpack(data)
    return fd, response & (FAN_ALLOW | FAN_DENY), response >> FAN_ERRNO_SHIFT & FAN_ERRNO_MASK


def encode_event(
    mask: int,
    fd: int,
    pid: int,
    rng: FileRange | None = None,
    extra_info: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """The bytes the kernel would return for one event (for fakes and tests): metadata,
    then the info records in the kernel's order (``extra_info``'s ``(type, body)``
    records of :data:`INFO_BEFORE_RANGE`, the range record if any, the others)."""
    extra = list(extra_info)
    info = b""
    for info_type, body in extra:
        if info_type in INFO_BEFORE_RANGE:
            info += INFO_HEADER.pack(info_type, 0, INFO_HEADER.size + len(body)) + body
    if rng is not None:
        info += RANGE_INFO.pack(
            FAN_EVENT_INFO_TYPE_RANGE, 0, RANGE_INFO.size, 0, rng.offset, rng.count
        )
    for info_type, body in extra:
        if info_type not in INFO_BEFORE_RANGE:
            info += INFO_HEADER.pack(info_type, 0, INFO_HEADER.size + len(body)) + body
    return (
        METADATA.pack(
            METADATA.size + len(info), FANOTIFY_METADATA_VERSION, 0, METADATA.size, mask, fd, pid
        )
        + info
    )
