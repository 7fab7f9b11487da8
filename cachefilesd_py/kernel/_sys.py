"""Errno-checked ctypes wrappers for the few system calls the ``os`` module lacks.

Every wrapper checks the C return value for ``-1`` and raises ``OSError(errno, ...)``
with the errno libc left behind (``use_errno=True`` makes ctypes save it right after the
call, before any other C code can overwrite it).

- ``ioctl_int_by_value``: ``CACHEFILES_IOC_READ_COMPLETE`` takes the msg_id *by value*
  as the third ioctl argument, not as a pointer. CPython's ``fcntl.ioctl`` converts an
  integer argument with the C format ``"i"`` and overflows above 2**31-1, while since
  Linux 6.10 msg_ids are allocated cyclically up to 2**32-1. So the argument goes through
  ctypes as an ``unsigned long``.
- ``syncfs``: flushes every dirty page and journal entry of one filesystem. The
  anonymous fd of on-demand mode has no fsync, so ``syncfs`` on the cache filesystem is
  the only way to make bytes written through it durable.
- ``punch_hole``: ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``; frees the
  blocks of a byte range and leaves a hole that reads as zeros and that SEEK_DATA skips.
- ``prctl``: process attributes the daemon's process model sets (the parent-death
  signal of a worker, its name in ``ps``, no-new-privileges, the capability bounding
  set and ambient set).
- ``capget``/``capset``: the thread's capability sets (``_LINUX_CAPABILITY_VERSION_3``:
  two 32-bit words per set).
- ``openat2`` / ``open_beneath``: open a path *beneath* a directory fd. A path checked
  lexically (``normpath``, ``startswith``) is not a path resolved beneath anything: the
  kernel follows a symlink ``a -> /`` and then ``..`` wherever the link led. With
  ``openat2(RESOLVE_BENEATH)`` (Linux 5.6) the kernel itself refuses, with EXDEV, any
  step of the walk that leaves the directory (``..`` above it, absolute paths, absolute
  symlinks, relative symlinks that climb out), and ``RESOLVE_NO_MAGICLINKS`` refuses
  (ELOOP) the ``/proc/<pid>/fd/N``-style links that jump to an open file anywhere.
  glibc has no wrapper, so it goes through ``syscall(2)``; where the kernel lacks it
  (ENOSYS, also what seccomp filters of old container runtimes answer) the walk is done
  one component at a time from the directory fd with ``O_NOFOLLOW``, refusing ``..``
  and every symlink: stricter, never looser.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

#: the C library the interpreter itself is linked with (``dlopen(NULL)``: the process's
#: global symbols). Not ``ctypes.util.find_library("c")``: that imports subprocess and
#: tempfile and runs ``ldconfig -p`` at every start, seconds in a slow guest.
_libc = ctypes.CDLL(None, use_errno=True)

_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: ``_IOW(0x98, 1, int)``: direction "write" is 1 on most architectures (bit 30) and 4
#: on powerpc/mips/sparc (bit 31 set instead).
_IOC_WRITE_HIGH = platform.machine().startswith(("ppc", "mips", "sparc"))
CACHEFILES_IOC_READ_COMPLETE = 0x80049801 if _IOC_WRITE_HIGH else 0x40049801


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def ioctl_int_by_value(fd: int, request: int, value: int) -> int:
    """``ioctl(fd, request, value)`` with ``value`` passed by value as unsigned long."""
    if not 0 <= value < 2**64:
        raise ValueError(f"ioctl argument out of range: {value}")
    return _check(_libc.ioctl(fd, request, value), "ioctl")


def read_complete(anon_fd: int, msg_id: int) -> None:
    """Tell the kernel that READ ``msg_id`` is done (``CACHEFILES_IOC_READ_COMPLETE``).

    The kernel then re-checks the requested range in the cache file: data there is
    served, a hole at the start gives the reader EIO. EINVAL means the request is gone
    (unknown id, not a READ, or, since 6.10, a READ of another object than this fd's).
    """
    if not 0 <= msg_id < 2**32:
        raise ValueError(f"msg_id out of range: {msg_id}")
    ioctl_int_by_value(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)


def syncfs(fd: int) -> None:
    """Make everything written to the filesystem holding ``fd`` durable."""
    _check(_libc.syncfs(fd), "syncfs")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of the file, keeping its size."""
    _check(
        _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
        "fallocate(PUNCH_HOLE)",
    )


PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_pdeathsig(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when the thread that forked it
    exits (the parent must be single-threaded for this to mean "the parent process")."""
    prctl(PR_SET_PDEATHSIG, signum)


def set_comm(name: str) -> None:
    """This process's name in ``ps``/``top`` (/proc/PID/comm, at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0), "prctl(PR_SET_NAME)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    return tuple(
        getattr(data[0], f) | (getattr(data[1], f) << 32)
        for f in ("effective", "permitted", "inheritable")
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (lowering needs no privilege)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


#: ``openat2`` has the same number on every architecture that got it with the unified
#: syscall table (x86-64, arm64, riscv, ...; Linux 5.6).
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(dirfd, path, {flags, mode, resolve})``: the new fd, or OSError
    (ENOSYS where the kernel has no openat2)."""
    how = _OpenHow(flags, mode, resolve)
    ret = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(int(ret), "openat2")


_openat2_missing = False


def open_beneath(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` (relative) beneath the directory ``dirfd``: never a file outside
    it, never through a magic link. EXDEV or ELOOP when the path tries to leave."""
    global _openat2_missing
    if os.path.isabs(path):
        raise OSError(errno.EXDEV, f"open_beneath: absolute path {path!r}")
    if not _openat2_missing:
        try:
            return openat2(
                dirfd, path, flags | os.O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, mode
            )
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _openat2_missing = True
    return open_beneath_by_components(dirfd, path, flags, mode)


def open_beneath_by_components(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """The fallback of :func:`open_beneath`: one ``openat`` per component, directories
    with ``O_PATH|O_DIRECTORY|O_NOFOLLOW`` (a symlink there is ENOTDIR), the last one
    with ``O_NOFOLLOW`` (a symlink there is ELOOP, also with ``O_PATH``, which would
    otherwise open the link itself); ``..`` is refused (EXDEV)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise OSError(errno.EISDIR, f"open_beneath: {path!r} names the directory itself")
    if ".." in parts:
        raise OSError(errno.EXDEV, f"open_beneath: {path!r} climbs with '..'")
    owned: list[int] = []
    try:
        cur = dirfd
        for part in parts[:-1]:
            cur = os.open(
                part,
                os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=cur,
            )
            owned.append(cur)
        fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)  # O_PATH|O_NOFOLLOW opens the link itself: refuse it like ELOOP
            raise OSError(errno.ELOOP, f"open_beneath: {path!r} ends in a symlink")
        return fd
    finally:
        for fd in owned:
            os.close(fd)
