"""Which EROFS image, and which path in it, a path on this host names (pure).

``cachefilesctl pin /mnt/base/usr/lib`` asks the daemon to pin the chunks behind
``/usr/lib`` of the image mounted at ``/mnt/base``. The kernel says what is mounted
where in ``/proc/self/mountinfo``; for an EROFS mount over fscache the super options
carry ``fsid=<fsid>`` and, with a shared domain, ``domain_id=<domain>``. The image's
primary blob is then ``erofs,<domain or fsid>/<fsid>`` — the name ``cachefilesctl
blobs`` prints.

Mountinfo line: ``id parent major:minor root mountpoint options [optional...] -
fstype source super-options``; ``root`` is the directory of the filesystem the mount
shows (a bind mount of a subdirectory), blanks and backslashes are written as octal
escapes (``\\040``).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.kernel.mountinfo import parse_mountinfo, unescape


@dataclass(frozen=True)
class ErofsMount:
    mountpoint: str
    root: str
    fsid: str
    domain_id: str | None

    @property
    def blob(self) -> str:
        """The image's primary blob, named as ``cachefilesctl blobs`` prints it."""
        return str(BlobKey.named(self.domain_id or self.fsid, self.fsid))


def erofs_mounts(mountinfo: str) -> list[ErofsMount]:
    """The EROFS mounts over fscache (those with an ``fsid``) of a mountinfo text."""
    out = []
    for entry in parse_mountinfo(mountinfo):
        if entry.fstype != "erofs":
            continue
        fsid = entry.super_option("fsid")
        if not fsid:
            continue  # a file- or block-backed EROFS mount: no blob of this daemon
        out.append(
            ErofsMount(
                entry.mount_point, entry.root, unescape(fsid), entry.super_option("domain_id")
            )
        )
    return out


def image_path_of(mountinfo: str, path: str) -> tuple[str, str]:
    """``(primary blob, path inside the image)`` for an absolute, resolved ``path``
    under an EROFS mount (the innermost one); ``ValueError`` if it is under none."""
    path = posixpath.normpath(path)
    best: ErofsMount | None = None
    for mount in erofs_mounts(mountinfo):
        mp = mount.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best.mountpoint)
        ):
            best = mount
    if best is None:
        raise ValueError(f"{path} is not on an EROFS mount this daemon serves (no fsid=)")
    rel = posixpath.relpath(path, best.mountpoint)
    inside = posixpath.normpath(posixpath.join(best.root, "" if rel == "." else rel))
    return best.blob, inside if inside.startswith("/") else "/" + inside
