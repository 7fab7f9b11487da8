"""mount(2) and the new mount API, for EROFS file-backed mounts (docs/protocol-fanotify.md).

EROFS (Linux 6.12+, ``CONFIG_EROFS_FS_BACKED_BY_FILE``) mounts a regular **file** as
its device: the kernel reads the image straight from the file, through the file's own
read path, so a fanotify pre-content mark on that file sees every read. util-linux's
``mount -t erofs FILE DIR`` does not do this: seeing a regular file it sets up a loop
device, whose reads bypass the file's read hooks and raise no event (and it has no
option to avoid that in Debian 12's util-linux). So the daemon mounts by system call:

- ``mount_file``: legacy ``mount(2)`` with the file's path as the source
  (``mount(path, target, "erofs", MS_RDONLY, "device=...")``). EROFS first tries the
  path as a block device, then opens it as a file.
- ``mount_fd``: the new mount API with the source given **as an open fd**
  (``fsopen("erofs")``, ``fsconfig(FSCONFIG_SET_FD, "source", fd)``, create,
  ``fsmount``, ``move_mount``). EROFS then reads through that very open file; there is
  no path lookup to race. EROFS's ``source`` parameter takes an fd in 7.3, not in
  6.12 (which rejects ``FSCONFIG_SET_FD`` for it with EINVAL); use ``mount_file`` there.

Extra blobs of a chunked image are named with ``device=PATH`` (one per blob, in the
image's device-table order); EROFS opens each path itself.

Either way the fanotify mark must exist **before** the mount: the kernel decides at
``open()`` whether a file raises pre-content events, and EROFS opens its backing files
while mounting.

With the new API, the kernel's error text (``e erofs: ...``) is read back from the
filesystem context and added to the ``OSError``, because errnos alone (EINVAL) do not
say which option was wrong.

Constants from the UAPI headers ``include/uapi/linux/mount.h`` (Linux 7.3)::

    #define MS_RDONLY                1
    #define MNT_DETACH               0x00000002
    #define FSOPEN_CLOEXEC           0x00000001
    #define FSMOUNT_CLOEXEC          0x00000001
    #define MOUNT_ATTR_RDONLY        0x00000001
    #define MOVE_MOUNT_F_EMPTY_PATH  0x00000004
    enum fsconfig_command {
            FSCONFIG_SET_FLAG = 0, FSCONFIG_SET_STRING = 1, ..., FSCONFIG_SET_FD = 5,
            FSCONFIG_CMD_CREATE = 6, ...
    };
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sequence

from cachefilesd_py.kernel._sys import _check, _libc
from cachefilesd_py.kernel.fd import OwnedFd

MS_RDONLY = 1
MNT_DETACH = 0x00000002
FSOPEN_CLOEXEC = 0x00000001
FSMOUNT_CLOEXEC = 0x00000001
MOUNT_ATTR_RDONLY = 0x00000001
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
AT_FDCWD = -100

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int

_NEW_API = all(hasattr(_libc, n) for n in ("fsopen", "fsconfig", "fsmount", "move_mount"))
if _NEW_API:  # glibc 2.36+
    _libc.fsopen.argtypes = [ctypes.c_char_p, ctypes.c_uint]
    _libc.fsopen.restype = ctypes.c_int
    _libc.fsconfig.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    _libc.fsconfig.restype = ctypes.c_int
    _libc.fsmount.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
    _libc.fsmount.restype = ctypes.c_int
    _libc.move_mount.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _libc.move_mount.restype = ctypes.c_int

Pathish = str | os.PathLike[str]


def mount(source: Pathish | None, target: Pathish, fstype: str, flags: int, data: str) -> None:
    """``mount(2)``, errno-checked."""
    _check(
        _libc.mount(
            None if source is None else os.fsencode(source),
            os.fsencode(target),
            fstype.encode(),
            flags,
            data.encode() if data else None,
        ),
        f"mount {fstype} on {os.fsdecode(target)}",
    )


def umount(target: Pathish, *, detach: bool = False) -> None:
    """``umount2(2)``; ``detach`` = ``MNT_DETACH`` (lazy: gone from the tree now,
    the superblock lives until its last user leaves). EBUSY: files open in it."""
    _check(
        _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0),
        f"umount {os.fsdecode(target)}",
    )


def _erofs_options(devices: Sequence[Pathish], options: Sequence[str]) -> list[str]:
    opts = [f"device={os.fsdecode(d)}" for d in devices] + list(options)
    for opt in opts:
        if "," in opt:
            raise ValueError(f"a mount option cannot contain ',': {opt!r}")
    return opts


def mount_file(
    image: Pathish,
    target: Pathish,
    *,
    devices: Sequence[Pathish] = (),
    options: Sequence[str] = (),
) -> None:
    """Mount the EROFS image *file* ``image`` on ``target``, read-only, by path."""
    mount(image, target, "erofs", MS_RDONLY, ",".join(_erofs_options(devices, options)))


def new_mount_api_available() -> bool:
    """Whether libc has ``fsopen``/``fsconfig``/``fsmount``/``move_mount`` (glibc 2.36+)."""
    return _NEW_API


def _context_messages(fs_fd: int) -> str:
    """The kernel's messages for a filesystem context (``read()`` of the fsopen fd:
    one ``e ...``/``w ...``/``i ...`` line per read, ENODATA when none is left)."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        for _ in range(16):
            msg = os.read(fs_fd, 1024)
            if not msg:
                break
            lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def _fsconfig(fs_fd: int, cmd: int, key: str | None, value: bytes | None, aux: int) -> None:
    ret = _libc.fsconfig(fs_fd, cmd, None if key is None else key.encode(), value, aux)
    if ret == -1:
        err = ctypes.get_errno()
        detail = _context_messages(fs_fd)
        raise OSError(
            err, f"fsconfig {key or cmd}: {os.strerror(err)}" + f" ({detail})" * bool(detail)
        )


def mount_fd(
    source_fd: int,
    target: Pathish,
    *,
    devices: Sequence[Pathish] = (),
    options: Sequence[str] = (),
) -> None:
    """Mount the EROFS image open as ``source_fd`` on ``target``, read-only, with the
    new mount API (the kernel keeps its own reference to the open file)."""
    if not _NEW_API:
        raise OSError(38, "the new mount API needs glibc 2.36 (fsopen)")  # ENOSYS
    fs = OwnedFd(_check(_libc.fsopen(b"erofs", FSOPEN_CLOEXEC), "fsopen erofs"))
    with fs:
        _fsconfig(fs.fileno(), FSCONFIG_SET_FD, "source", None, source_fd)
        for opt in _erofs_options(devices, options):
            key, eq, value = opt.partition("=")
            if eq:
                _fsconfig(fs.fileno(), FSCONFIG_SET_STRING, key, value.encode(), 0)
            else:
                _fsconfig(fs.fileno(), FSCONFIG_SET_FLAG, key, None, 0)
        _fsconfig(fs.fileno(), FSCONFIG_CMD_CREATE, None, None, 0)
        mnt_fd = _libc.fsmount(fs.fileno(), FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY)
        if mnt_fd == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"fsmount: {os.strerror(err)} ({_context_messages(fs.fileno())})")
    with OwnedFd(mnt_fd) as mnt:
        _check(
            _libc.move_mount(
                mnt.fileno(), b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount to {os.fsdecode(target)}",
        )
