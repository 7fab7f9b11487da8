"""Which EROFS image, and which path in it, a path on this host names (pure).

``cachefilesctl pin /mnt/base/usr/lib`` asks the daemon to pin the chunks behind
``/usr/lib`` of the image mounted at ``/mnt/base``. The kernel says what is mounted
where in ``/proc/self/mountinfo``; for an EROFS mount over fscache the super options
carry ``fsid=<fsid>`` and, with a shared domain, ``domain_id=<domain>``. The image's
primary blob is then ``erofs,<domain or fsid>/<fsid>`` — the name ``cachefilesctl
blobs`` prints.

In fanotify mode the image is mounted **file-backed**: the mount's source is the
image's cache file (``<dir>/fanotify/<volume>/<name>``) and there is no ``fsid``, so
the mount line names no blob. Such a mount is matched by its mount point against the
images the daemon says it serves (``cachefilesctl status``: each image's mount point
and blobs, the first its primary): the daemon's own list, never a guess from a file
name, so a file-backed EROFS mount the daemon does not serve (a loop or an unrelated
image file) is refused, not mistaken for one of its images.

Mountinfo line: ``id parent major:minor root mountpoint options [optional...] -
fstype source super-options``; ``root`` is the directory of the filesystem the mount
shows (a bind mount of a subdirectory), blanks and backslashes are written as octal
escapes (``\\040``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.kernel.mountinfo import parse_mountinfo, unescape


@dataclass(frozen=True)
class ErofsMount:
    mountpoint: str
    root: str
    #: None: a file- or block-backed mount (no fscache blob names it)
    fsid: str | None
    domain_id: str | None
    source: str = ""

    @property
    def blob(self) -> str | None:
        """The image's primary blob, named as ``cachefilesctl blobs`` prints it (None:
        not an fscache mount; fanotify mode names it by its mount point)."""
        if self.fsid is None:
            return None
        return str(BlobKey.named(self.domain_id or self.fsid, self.fsid))


def erofs_mounts(mountinfo: str, *, file_backed: bool = False) -> list[ErofsMount]:
    """The EROFS mounts over fscache (those with an ``fsid``) of a mountinfo text;
    ``file_backed``: the others too (fanotify mode's, a loop device's)."""
    out = []
    for entry in parse_mountinfo(mountinfo):
        if entry.fstype != "erofs":
            continue
        fsid = entry.super_option("fsid")
        if not fsid and not file_backed:
            continue  # a file- or block-backed EROFS mount: no blob of on-demand mode
        out.append(
            ErofsMount(
                entry.mount_point,
                entry.root,
                unescape(fsid) if fsid else None,
                entry.super_option("domain_id"),
                entry.source,
            )
        )
    return out


def image_path_of(
    mountinfo: str, path: str, served: Callable[[], Mapping[str, str]] | None = None
) -> tuple[str, str]:
    """``(primary blob, path inside the image)`` for an absolute, resolved ``path``
    under an EROFS mount (the innermost one); ``ValueError`` if it is under none this
    daemon serves. ``served()``: the daemon's file-backed images, mount point →
    primary blob (fanotify mode, see the module docstring); asked only when the
    mount has no ``fsid``."""
    path = posixpath.normpath(path)
    best: ErofsMount | None = None
    for mount in erofs_mounts(mountinfo, file_backed=served is not None):
        mp = mount.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best.mountpoint)
        ):
            best = mount
    if best is None:
        raise ValueError(f"{path} is not on an EROFS mount this daemon serves (no fsid=)")
    blob = best.blob
    if blob is None:
        assert served is not None
        blob = served().get(best.mountpoint)
        if blob is None:
            raise ValueError(
                f"{path} is on a file-backed EROFS mount ({best.mountpoint}, from "
                f"{best.source}) that this daemon does not serve"
            )
    rel = posixpath.relpath(path, best.mountpoint)
    inside = posixpath.normpath(posixpath.join(best.root, "" if rel == "." else rel))
    return blob, inside if inside.startswith("/") else "/" + inside
