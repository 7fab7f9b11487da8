"""``cachefilesd-py --check-config``: everything that can be checked without binding.

It prints the effective configuration in configuration syntax (``config/render.py``),
the commands the kernel will be told, one ``write`` each, and what it found:

- the cache directory exists and is a directory, and its filesystem can hold a cache.
  ``cachefiles_add_cache`` refuses at ``bind`` a root without ``tmpfile``, xattrs,
  ``statfs`` or ``sync_fs``, with a block size above the page size (EOPNOTSUPP),
  read-only (EROFS) or on an idmapped mount (EINVAL); tmpfs has no ``sync_fs``. The
  kernel then opens every cache file with ``O_DIRECT``, sets ``user.CacheFiles.cache``
  xattrs, and asks ``SEEK_DATA``/``SEEK_HOLE`` which ranges are cached, so a
  filesystem that reports no holes would make unwritten ranges look cached. These are
  probed on an ``O_TMPFILE`` in the directory: nothing is left behind;
- the ``secctx`` label has an LSM to resolve it (the kernel resolves it when it reads
  the line, and fails with EOPNOTSUPP when no LSM handles security contexts);
- ``source`` rules: their URLs were parsed with the file; ``file://`` base directories
  exist;
- the kernel: ``/dev/cachefiles`` exists, and on-demand mode needs Linux 5.19 or later;
- free space: culling starts at once if the filesystem is already below ``bcull`` or
  ``fcull``.

Exit status: 0 when nothing is wrong (warnings allowed), 1 when a check failed (an OS
or filesystem problem, as cachefilesd's "Can't confirm cache location"), 2 when the
file breaks a rule.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

from cachefilesd_py import __version__
from cachefilesd_py.config.load import read_config
from cachefilesd_py.config.model import Config
from cachefilesd_py.config.parse import kernel_defaults_text
from cachefilesd_py.config.render import render_config
from cachefilesd_py.errors import ConfigError

# the very commands the daemon sends (check-config runs below the daemon, beside it)
from cachefilesd_py.frontends.bind import kernel_commands
from cachefilesd_py.kernel.mountinfo import parse_mountinfo

PAGE_SIZE = mmap.PAGESIZE
#: filesystems the daemon is tested on; others are probed, and warned about
TESTED_FS = ("ext4", "xfs", "btrfs")
#: no ``sync_fs`` (or no xattrs): the kernel refuses them at bind
REFUSED_FS = {
    "tmpfs": "tmpfs has no sync_fs: the kernel refuses it at bind (EOPNOTSUPP)",
    "ramfs": "ramfs has no sync_fs and no xattrs: the kernel refuses it at bind (EOPNOTSUPP)",
    "devtmpfs": "devtmpfs is a tmpfs: the kernel refuses it at bind (EOPNOTSUPP)",
}
#: LSMs that resolve security contexts (``secctx_to_secid``)
SECCTX_LSMS = ("selinux", "smack", "apparmor")
ONDEMAND_SINCE = (5, 19)


@dataclass(frozen=True)
class Finding:
    """One result: ``level`` is ``ok``, ``warning`` or ``error``."""

    level: str
    text: str


def ok(text: str) -> Finding:
    return Finding("ok", text)


def warning(text: str) -> Finding:
    return Finding("warning", text)


def error(text: str) -> Finding:
    return Finding("error", text)


# -- the cache directory ----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> Mount | None:
    """The mount ``path`` lives on: same device, longest mount point prefix."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    real = os.path.realpath(path)
    best: Mount | None = None
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        entries = parse_mountinfo(f.read())
    for entry in entries:
        point = entry.mount_point
        if entry.dev != dev or (real != point and not real.startswith(point.rstrip("/") + "/")):
            continue
        if best is None or len(point) > len(best.mount_point):
            options = frozenset(entry.mount_options) | frozenset(entry.super_options)
            best = Mount(point, entry.fstype, entry.source, options)
    return best


@contextlib.contextmanager
def _probe_file(directory: str) -> Iterator[tuple[int, bool]]:
    """An unnamed file in ``directory`` (``O_TMPFILE``), else a named one unlinked at
    once; yields ``(fd, is_tmpfile)``."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        tmpfile = True
    except OSError:
        fd = os.open(
            os.path.join(directory, f".cachefilesd-py-check.{os.getpid()}"),
            os.O_CREAT | os.O_EXCL | os.O_RDWR,
            0o600,
        )
        os.unlink(os.path.join(directory, f".cachefilesd-py-check.{os.getpid()}"))
        tmpfile = False
    try:
        yield fd, tmpfile
    finally:
        os.close(fd)


def probe_filesystem(directory: str) -> list[Finding]:
    """What cachefiles will do to files in ``directory``, tried on a scratch file."""
    try:
        with _probe_file(directory) as (fd, tmpfile):
            return [
                ok("O_TMPFILE works")
                if tmpfile
                else error("no O_TMPFILE: the kernel creates cache files as tmpfiles"),
                _probe_xattr(fd),
                _probe_sparse(fd),
                _probe_direct(fd),
            ]
    except OSError as exc:
        return [warning(f"cannot probe {directory} ({exc.strerror}): run as root to check it")]


def _probe_xattr(fd: int) -> Finding:
    try:
        os.setxattr(fd, "user.cachefilesd-py.check", b"1")
        if os.getxattr(fd, "user.cachefilesd-py.check") != b"1":
            return error("user xattrs do not read back what was written")
    except OSError as exc:
        return error(
            f"no user xattrs ({exc.strerror}): the kernel keeps user.CacheFiles.cache on "
            "every cache file (mount with user_xattr?)"
        )
    return ok("user xattrs work")


def _probe_sparse(fd: int) -> Finding:
    size, at = 2 << 20, 1 << 20
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"x" * PAGE_SIZE, at)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        hole = os.lseek(fd, at, os.SEEK_HOLE)
    except OSError as exc:
        return error(f"SEEK_DATA/SEEK_HOLE failed ({exc.strerror})")
    if data == 0 or hole >= size:
        return error(
            "the filesystem reports no holes (SEEK_DATA/SEEK_HOLE): the kernel would take "
            "unwritten ranges of a cache file for cached data"
        )
    return ok("sparse files work (SEEK_DATA/SEEK_HOLE report holes)")


def _probe_direct(fd: int) -> Finding:
    try:
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        return error(f"no O_DIRECT ({exc.strerror}): the kernel opens cache files with it")
    buf = mmap.mmap(-1, PAGE_SIZE)
    try:
        buf.write(b"d" * PAGE_SIZE)
        os.pwritev(dfd, [buf], 0)
    except OSError as exc:
        return error(f"O_DIRECT writes fail ({exc.strerror}): the kernel writes cache files so")
    finally:
        os.close(dfd)
        buf.close()
    return ok("O_DIRECT works")


def check_cache_dir(directory: str) -> list[Finding]:
    """Exists, is a directory, on a filesystem that can hold a cache."""
    blank = (
        " (the value ends in a blank, kept as cachefilesd keeps it)"
        if (directory != directory.rstrip())
        else ""
    )
    try:
        st = os.stat(directory)
    except OSError as exc:
        return [error(f"dir {directory!r}: Can't confirm cache location: {exc.strerror}{blank}")]
    if not stat.S_ISDIR(st.st_mode):
        return [error(f"dir {directory!r}: not a directory{blank}")]
    found = [ok(f"dir {directory}: a directory")]
    try:
        mount = mount_of(directory)
    except (OSError, ValueError, IndexError):
        mount = None
    if mount is None:
        found.append(warning(f"cannot tell which filesystem holds {directory}"))
    else:
        where = f"{mount.fstype} ({mount.source}, mounted on {mount.mount_point})"
        if mount.fstype in REFUSED_FS:
            return [*found, error(f"dir {directory} is on {where}: {REFUSED_FS[mount.fstype]}")]
        if "ro" in mount.options:
            return [
                *found,
                error(f"dir {directory} is on a read-only mount: the kernel refuses it (EROFS)"),
            ]
        if "idmapped" in mount.options:
            return [
                *found,
                error(f"dir {directory} is on an idmapped mount: the kernel refuses it (EINVAL)"),
            ]
        found.append(
            ok(f"on {where}")
            if mount.fstype in TESTED_FS
            else warning(
                f"on {where}: not a filesystem this daemon is tested on ({', '.join(TESTED_FS)})"
            )
        )
    sv = os.statvfs(directory)
    if sv.f_bsize > PAGE_SIZE:
        found.append(
            error(
                f"block size {sv.f_bsize} is above the page size {PAGE_SIZE}: the kernel refuses it"
            )
        )
    return found + probe_filesystem(directory)


def check_free_space(cfg: Config, directory: str) -> list[Finding]:
    """Warn when the filesystem is already below a cull or stop limit: the limits are
    fractions of the whole filesystem, which may hold more than the cache."""
    try:
        sv = os.statvfs(directory)
    except OSError:
        return []
    found = []
    for kind, free, total in (("b", sv.f_bavail, sv.f_blocks), ("f", sv.f_ffree, sv.f_files)):
        if not total:
            continue
        pct = 100 * free / total
        what = "blocks" if kind == "b" else "files (inodes)"
        if pct < cfg.threshold(kind + "stop"):
            found.append(
                warning(
                    f"free {what} {pct:.1f}% < {kind}stop: the kernel will refuse new cache data"
                )
            )
        elif pct < cfg.threshold(kind + "cull"):
            found.append(warning(f"free {what} {pct:.1f}% < {kind}cull: culling starts at once"))
        else:
            found.append(
                ok(f"free {what}: {pct:.1f}% (culling below {cfg.threshold(kind + 'cull')}%)")
            )
    return found


# -- the rest -----------------------------------------------------------------------------


def active_lsms(path: str = "/sys/kernel/security/lsm") -> list[str] | None:
    try:
        return Path(path).read_text().strip().split(",")
    except OSError:
        return None


def check_secctx(cfg: Config, lsms: list[str] | None) -> list[Finding]:
    if cfg.secctx is None:
        return []
    if lsms is None:
        return [
            warning(
                "secctx: cannot read /sys/kernel/security/lsm to see whether an LSM resolves it"
            )
        ]
    usable = [m for m in lsms if m in SECCTX_LSMS]
    if not usable:
        return [
            error(
                f"secctx: no active LSM resolves security contexts (active: {', '.join(lsms)}); "
                "the kernel refuses the secctx line (EOPNOTSUPP). Remove it or enable SELinux"
            )
        ]
    return [ok(f"secctx: resolved by {', '.join(usable)} when the kernel reads it")]


def check_sources(cfg: Config) -> list[Finding]:
    found = []
    for rule in cfg.sources:
        url = urlsplit(rule.url_template)
        where = f"{rule.file}:{rule.line}: source {rule.pattern}"
        if url.scheme != "file":
            found.append(ok(f"{where}: {url.scheme}://{url.netloc} (not contacted)"))
            continue
        base = os.path.dirname(unquote(urlsplit(rule.url_template.split("{", 1)[0]).path))
        if os.path.isdir(base):
            found.append(ok(f"{where}: directory {base} exists"))
        else:
            found.append(warning(f"{where}: directory {base} does not exist (yet)"))
    return found


def check_kernel(cfg: Config, release: str | None = None) -> list[Finding]:
    found = []
    if os.path.exists("/dev/cachefiles"):
        found.append(ok("/dev/cachefiles exists"))
    else:
        found.append(
            warning("/dev/cachefiles does not exist: load the module (modprobe cachefiles)")
        )
    if cfg.ondemand:
        release = release or os.uname().release
        try:
            version = tuple(int(p) for p in release.split("-")[0].split(".")[:2])
        except ValueError:
            version = ()
        if version and version < ONDEMAND_SINCE:
            found.append(
                error(f"ondemand needs Linux {'.'.join(map(str, ONDEMAND_SINCE))}+, not {release}")
            )
    return found


def check_all(cfg: Config) -> list[Finding]:
    assert cfg.dir is not None
    found = check_cache_dir(cfg.dir)
    if not any(f.level == "error" for f in found):
        found += check_free_space(cfg, cfg.dir)
    return found + check_secctx(cfg, active_lsms()) + check_sources(cfg) + check_kernel(cfg)


def report(cfg: Config, path: str, found: list[Finding]) -> str:
    """The effective configuration, the kernel commands and the findings; comment lines
    besides the directives, so the whole output is itself a configuration file."""
    lines = [
        f"# cachefilesd-py {__version__} --check-config {path}",
        "# The effective configuration; a commented-out directive shows a default.",
        f"# Unset thresholds are the kernel's {kernel_defaults_text()}.",
        "",
        *render_config(cfg),
        "",
        "# The kernel will be told, one write each, in this order:",
        *[f"#   {c.decode(errors='backslashreplace')}" for c in kernel_commands(cfg)],
        f"#   bind{' ondemand' if cfg.ondemand else ''}",
        "",
        "# Checks (without binding):",
        *[f"#   {f.level:<8}{f.text}" for f in found],
    ]
    return "\n".join(lines) + "\n"


def check_config_main(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Load ``path``, check it, print the report; the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        cfg = read_config(path)
    except ConfigError as exc:
        print(f"cachefilesd-py: {exc}", file=err)
        return exc.exit_code
    found = check_all(cfg)
    try:
        text = report(cfg, path, found)
    except ConfigError as exc:  # a value no kernel command can carry
        print(f"cachefilesd-py: {path}: {exc.rule}", file=err)
        return exc.exit_code
    out.write(text)
    errors = [f for f in found if f.level == "error"]
    for f in errors:
        where = f"{path}:{cfg.dir_line}" if f.text.startswith("dir ") and cfg.dir_line else path
        print(f"cachefilesd-py: {where}: {f.text}", file=err)
    return 1 if errors else 0
