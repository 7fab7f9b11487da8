"""What the running kernel can do, asked of the kernel itself (guest tier only).

The guest suite runs on two test kernels (``scripts/vmtest --kernel 6.12|7.3``): 6.12
has cachefiles on-demand mode, 7.3 has fanotify pre-content events and EROFS file-backed
mounts instead (on-demand mode was removed from mainline). Each guest test is marked
with what it needs, and ``tests/conftest.py`` skips, with the reason below, what this
kernel cannot do:

- ``ondemand``: ``bind ondemand`` on ``/dev/cachefiles``. The probe binds a cache
  directory on a private tmpfs: a kernel without on-demand mode refuses the argument
  (EINVAL) before it looks at the directory; one with it gets past the argument and
  refuses tmpfs (EOPNOTSUPP), so nothing is ever bound.
- ``fanotify``: a ``FAN_CLASS_PRE_CONTENT`` group, a ``FAN_PRE_ACCESS`` mark (on tmpfs
  the kernel refuses the mark with EOPNOTSUPP if it knows the event, EINVAL if not),
  and EROFS file-backed mounts: ``CONFIG_EROFS_FS_BACKED_BY_FILE`` in the kernel's own
  ``/proc/config.gz`` (both test kernels have IKCONFIG); without it, ``mount(2)`` of
  this very file as EROFS (a non-image file on a filesystem with a read path fails with
  EINVAL when file-backed mounts exist, ENOTBLK when they do not; tmpfs files cannot
  back EROFS at all, hence not a file of the probe's tmpfs).
- unmarked guest tests need only what both kernels have (classic mode).

Each probe returns None when the feature is there, else the reason it is not.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.kernel import fanotify, mount

PROBE_ROOT = Path("/tmp/vm")


@dataclass(frozen=True)
class KernelFeatures:
    release: str
    #: None if ``bind ondemand`` works, else why not
    ondemand: str | None
    #: None if pre-content events and file-backed EROFS work, else why not
    fanotify: str | None

    def missing(self, marker: str) -> str | None:
        """Why tests marked ``marker`` cannot run here (None: they can)."""
        return {"ondemand": self.ondemand, "fanotify": self.fanotify}.get(marker)


@contextlib.contextmanager
def _private_tmpfs() -> Iterator[Path]:
    PROBE_ROOT.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="probe-", dir=PROBE_ROOT))
    mount.mount("tmpfs", where, "tmpfs", 0, "size=1m")
    try:
        yield where
    finally:
        mount.umount(where, detach=True)
        where.rmdir()


def _name(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


def probe_ondemand(scratch: Path) -> str | None:
    try:
        dev = os.open("/dev/cachefiles", os.O_RDWR)
    except OSError as exc:
        return f"no /dev/cachefiles ({_name(exc.errno)})"
    cache = scratch / "cache"
    cache.mkdir()
    try:
        os.write(dev, f"dir {cache}".encode())
        try:
            os.write(dev, b"bind ondemand")
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return None  # the argument was accepted, tmpfs was not
            return f"the kernel refuses `bind ondemand` ({_name(exc.errno)})"
        return None  # bound (tmpfs accepted after all); closing the device unbinds
    finally:
        os.close(dev)


def probe_fanotify(scratch: Path) -> str | None:
    try:
        group = fanotify.fanotify_init(
            fanotify.FAN_CLASS_PRE_CONTENT | fanotify.FAN_CLOEXEC, os.O_RDONLY
        )
    except OSError as exc:
        return f"fanotify_init(FAN_CLASS_PRE_CONTENT) fails ({_name(exc.errno)})"
    probe = scratch / "file"
    probe.write_bytes(b"not an erofs image" * 512)
    with group:
        try:
            fanotify.mark_pre_access(group.fileno(), probe)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                return f"a FAN_PRE_ACCESS mark fails ({_name(exc.errno)})"
    return probe_erofs_file_backed(scratch)


def _kernel_config(option: str) -> str | None:
    """``y``/``m``/``n`` from /proc/config.gz, or None when the kernel has no IKCONFIG."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{option}="):
            return line.split("=", 1)[1]
    return "n"


def probe_erofs_file_backed(scratch: Path) -> str | None:
    configured = _kernel_config("CONFIG_EROFS_FS_BACKED_BY_FILE")
    if configured is not None:
        return None if configured == "y" else "no CONFIG_EROFS_FS_BACKED_BY_FILE"
    target = scratch / "mnt"
    target.mkdir()
    try:
        mount.mount_file(__file__, target)
    except OSError as exc:
        if exc.errno == errno.ENOTBLK:
            return "EROFS cannot mount a regular file (no file-backed mounts)"
        if exc.errno == errno.ENODEV:
            return "no EROFS"
        return None  # a file-backed mount was tried and found no image
    mount.umount(target)
    return None


def probe() -> KernelFeatures:
    release = os.uname().release
    with _private_tmpfs() as scratch:
        ondemand_dir = scratch / "ondemand"
        fanotify_dir = scratch / "fanotify"
        ondemand_dir.mkdir()
        fanotify_dir.mkdir()
        return KernelFeatures(
            release=release,
            ondemand=probe_ondemand(ondemand_dir),
            fanotify=probe_fanotify(fanotify_dir),
        )
