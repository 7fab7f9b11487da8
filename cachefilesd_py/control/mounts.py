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
import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class ErofsMount:
    mountpoint: str
    root: str
    fsid: str
    domain_id: str | None

    @property
    def blob(self) -> str:
        return f"erofs,{self.domain_id or self.fsid}/{self.fsid}"


def erofs_mounts(mountinfo: str) -> list[ErofsMount]:
    """The EROFS mounts over fscache (those with an ``fsid``) of a mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 4 or fields[sep + 1] != "erofs":
            continue
        opts = dict(
            (o.partition("=")[0], o.partition("=")[2]) for o in fields[sep + 3].split(",")
        )
        fsid = opts.get("fsid")
        if not fsid:
            continue  # a file- or block-backed EROFS mount: no blob of this daemon
        out.append(
            ErofsMount(
                _unescape(fields[4]), _unescape(fields[3]), _unescape(fsid), opts.get("domain_id")
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
