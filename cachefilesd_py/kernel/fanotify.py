"""fanotify system calls for pre-content events (docs/protocol-fanotify.md).

A *pre-content* group (``FAN_CLASS_PRE_CONTENT``) with a ``FAN_PRE_ACCESS`` mark on a
file is asked before any read of (or write to) that file: the reading task sleeps until
the group answers ``FAN_ALLOW`` or ``FAN_DENY`` for the event. The event carries an fd
of the file opened *without* notifications, so bytes written through it raise no event
of their own: that is how a daemon fills a missing range before allowing the read.

The wrappers here are thin and errno-checked (``OSError`` with the kernel's errno);
decoding what ``read()`` returns and encoding responses is pure code in
``frontends/fanotify/wire.py``. Every fd they create is wrapped in an
:class:`~cachefilesd_py.kernel.fd.OwnedFd` at once.

Constants and layouts are those of the UAPI header ``include/uapi/linux/fanotify.h``
(quoted from Linux 7.3)::

    #define FAN_PRE_ACCESS          0x00100000      /* Pre-content access hook */
    #define FAN_CLOEXEC             0x00000001
    #define FAN_NONBLOCK            0x00000002
    #define FAN_CLASS_PRE_CONTENT   0x00000008
    #define FAN_UNLIMITED_QUEUE     0x00000010
    #define FAN_MARK_ADD            0x00000001
    #define FAN_MARK_REMOVE         0x00000002
    #define FAN_MARK_IGNORE         0x00000400
    #define FAN_MARK_INODE          0x00000000

    struct fanotify_response {
            __s32 fd;
            __u32 response;
    };

Kernel versions (docs/protocol-fanotify.md, "Versions"): ``FAN_PRE_ACCESS``, the range
info record and ``FAN_DENY_ERRNO`` came together in Linux 6.14, so a kernel that
accepts a ``FAN_PRE_ACCESS`` mark also accepts a deny with an errno. Older kernels fail
the mark with EINVAL; kernels built without ``CONFIG_FANOTIFY`` fail ``fanotify_init``
with ENOSYS, and without ``CONFIG_FANOTIFY_ACCESS_PERMISSIONS`` the permission classes
with EINVAL. Filesystems must opt in to pre-content marks (ext4, xfs, btrfs do); the
mark fails with EOPNOTSUPP elsewhere (tmpfs, 9p, overlayfs).

Whether a file raises pre-content events is decided when it is **opened**: an fd opened
before the mark existed never raises one, even after the mark is added (the kernel sets
the file's notification mode in ``open()``). So the mark must be in place before EROFS
opens its backing file at mount time.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import termios
from pathlib import Path

from cachefilesd_py.kernel._sys import _check, _libc
from cachefilesd_py.kernel.fd import OwnedFd

# -- fanotify_init(2) flags ------------------------------------------------------------
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008
#: without it a full queue (``fs.fanotify.max_queued_events``, 16384 by default) makes
#: the kernel drop new permission events *and allow the access* (fail-open)
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
FAN_REPORT_FD_ERROR = 0x00002000

# -- events ------------------------------------------------------------------------------
FAN_ACCESS = 0x00000001
FAN_MODIFY = 0x00000002
FAN_CLOSE_WRITE = 0x00000008
FAN_CLOSE_NOWRITE = 0x00000010
FAN_OPEN = 0x00000020
FAN_Q_OVERFLOW = 0x00004000
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_PRE_ACCESS = 0x00100000
FAN_ONDIR = 0x40000000

# -- fanotify_mark(2) flags --------------------------------------------------------------
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_ONLYDIR = 0x00000008
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_EVICTABLE = 0x00000200
FAN_MARK_IGNORE = 0x00000400
FAN_MARK_INODE = 0x00000000
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_FILESYSTEM = 0x00000100

AT_FDCWD = -100

_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int

#: what the event fds are opened with: O_RDWR so that a missing range can be written
#: through the event's own fd (which raises no event), O_LARGEFILE for files > 2 GiB
#: (fanotify adds it on 64-bit anyway), O_CLOEXEC so no child inherits one.
EVENT_FD_FLAGS = os.O_RDWR | os.O_LARGEFILE | os.O_CLOEXEC

#: room for ~1300 pre-content events (24 bytes of metadata + 24 of range record) per
#: read(); the kernel returns whole events only
READ_BUFFER_SIZE = 64 * 1024


def fanotify_init(flags: int, event_f_flags: int) -> OwnedFd:
    """``fanotify_init(flags, event_f_flags)``: a new group, as an owned fd.

    ENOSYS: the kernel has no fanotify. EINVAL: a flag it does not know (e.g.
    ``FAN_CLASS_PRE_CONTENT`` without ``CONFIG_FANOTIFY_ACCESS_PERMISSIONS``). EPERM:
    the permission classes and ``FAN_UNLIMITED_QUEUE`` need CAP_SYS_ADMIN."""
    fd = _check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")
    return OwnedFd(fd)


def pre_content_group(*, nonblocking: bool = True, unlimited_queue: bool = True) -> OwnedFd:
    """A ``FAN_CLASS_PRE_CONTENT`` group whose event fds are writable.

    ``unlimited_queue`` should stay on outside tests: with a bounded queue the kernel
    lets an access through unanswered once the queue is full."""
    flags = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC
    if nonblocking:
        flags |= FAN_NONBLOCK
    if unlimited_queue:
        flags |= FAN_UNLIMITED_QUEUE
    return fanotify_init(flags, EVENT_FD_FLAGS)


def fanotify_mark(
    group_fd: int,
    flags: int,
    mask: int,
    path: str | os.PathLike[str] | None,
    dirfd: int = AT_FDCWD,
) -> None:
    """``fanotify_mark(group_fd, flags, mask, dirfd, path)``.

    With ``path=None`` the object is ``dirfd`` itself (an open fd of the file).
    EOPNOTSUPP: pre-content marks on a filesystem that does not allow them. EINVAL: an
    event the kernel does not know (``FAN_PRE_ACCESS`` before 6.14), or a pre-content
    mark on something that is not a regular file or directory. ENOENT: removing a mark
    that is not there. EEXIST: mixing ``FAN_MARK_IGNORE`` with an old-style ignore
    mask on one mark."""
    raw = None if path is None else os.fsencode(path)
    _check(_libc.fanotify_mark(group_fd, flags, mask, dirfd, raw), "fanotify_mark")


def mark_pre_access(group_fd: int, path: str | os.PathLike[str] | Path) -> None:
    """Add ``FAN_PRE_ACCESS`` to the inode mark of one regular file (no symlink
    following: the cache file is named exactly)."""
    fanotify_mark(
        group_fd, FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_DONT_FOLLOW, FAN_PRE_ACCESS, path
    )


def unmark_pre_access(group_fd: int, path: str | os.PathLike[str] | Path) -> None:
    """Remove ``FAN_PRE_ACCESS`` from the file's inode mark (ENOENT: no such mark)."""
    fanotify_mark(
        group_fd, FAN_MARK_REMOVE | FAN_MARK_INODE | FAN_MARK_DONT_FOLLOW, FAN_PRE_ACCESS, path
    )


def ignore_pre_access(group_fd: int, path: str | os.PathLike[str] | Path) -> None:
    """Add ``FAN_PRE_ACCESS`` to the file's *ignore* mask (``FAN_MARK_IGNORE``, 6.0+):
    events of this group for this inode are suppressed while the mark stays."""
    fanotify_mark(
        group_fd,
        FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_DONT_FOLLOW | FAN_MARK_IGNORE,
        FAN_PRE_ACCESS,
        path,
    )


def read_events(group_fd: int, size: int = READ_BUFFER_SIZE) -> bytes:
    """One ``read()`` of the group: zero or more whole event records (pure decoding in
    ``frontends/fanotify/wire.py``). ``b""`` when a non-blocking group has nothing
    (EAGAIN). Every event in the returned bytes carries an fd that is now the
    caller's to answer and close.

    EINVAL: ``size`` is smaller than the next event."""
    try:
        return os.read(group_fd, size)
    except BlockingIOError:
        return b""


def read_events_into(group_fd: int, buffer: memoryview) -> int:
    """One ``read()`` of the group straight into ``buffer`` (e.g. a slice of a shared
    mapping); the number of bytes the kernel wrote, 0 when a non-blocking group has
    nothing. The kernel copies each event to ``buffer`` before ``read()`` returns and a
    SIGKILL takes effect only on the way back to user space, so whatever the caller's
    fate, every event the kernel handed over is in ``buffer`` (``frontends/fanotify/
    inflight.py`` relies on it: docs/protocol-fanotify.md, "Failover")."""
    try:
        return os.readv(group_fd, [buffer])
    except BlockingIOError:
        return 0


def accepts_response(group_fd: int, record: bytes) -> bool:
    """Whether the group accepts ``record``, a response that names no event (fd
    ``FAN_NOFD`` with an info record, e.g. ``wire.deny_errno_probe``): True if the
    write succeeds, False on EINVAL. This is how a daemon learns whether the kernel
    takes ``FAN_DENY_ERRNO(e)`` before any event needs it."""
    try:
        write_response(group_fd, record)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def queued_bytes(group_fd: int) -> int:
    """``ioctl(FIONREAD)``: how many bytes of events wait in the queue, not yet read
    (events already read and waiting for an answer do not count)."""
    buf = array.array("i", [0])
    fcntl.ioctl(group_fd, termios.FIONREAD, buf, True)
    return buf[0]


def write_response(group_fd: int, record: bytes) -> None:
    """Write one encoded ``struct fanotify_response`` (8 bytes, optionally followed by
    an info record) to the group. The kernel takes exactly one response per write.

    ENOENT: no pending permission event has that fd (already answered, or never
    read). EINVAL: a malformed response, e.g. an errno the kernel does not allow in
    ``FAN_DENY_ERRNO``, an errno on a kernel before 6.14, or an errno with
    ``FAN_ALLOW``; the event then stays pending."""
    if len(record) < 8:
        raise ValueError(f"a fanotify response is at least 8 bytes, got {len(record)}")
    written = os.write(group_fd, record)
    if written != len(record):  # the kernel answers all or nothing
        raise OSError(0, f"short write of a fanotify response: {written} of {len(record)}")
