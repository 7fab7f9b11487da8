"""Cache files the daemon does not vouch for are replaced, not served.

A cache file whose presence sidecar does not vouch for it (a crash before its sidecar
was bound, another daemon's file, an older version of the blob) could hold bytes of
another version, and the kernel would serve them without asking. It cannot be culled
while the kernel looks it up: the kernel marks the file in use before it sends OPEN
(``cull`` gives EBUSY). But the kernel checks the file's coherency xattr
(``user.CacheFiles.cache``: the object size and content type, ``docs/protocol-ondemand.md``
§3.1) only *after* our ``copen``, and a file that fails the check is replaced by a
fresh one. So the xattr is spoiled (same length, an impossible object size) before the
``copen``, and the kernel starts the blob afresh; the stale file is replaced when the
new one is committed. Verified on 6.12 in the guest tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger("ondemand")

#: the kernel's coherency xattr on every cache file (object size, content type)
KERNEL_AUX_XATTR: Final = "user.CacheFiles.cache"


def spoil_coherency(path: Path, blob: str) -> int | None:
    """Make the kernel discard the cache file at ``path`` at its next check; returns
    the stale file's inode number (the new file is told from it by its inode), or None
    if the xattr could not be spoiled (logged)."""
    try:
        st = path.stat()
        aux = os.getxattr(path, KERNEL_AUX_XATTR)
        os.setxattr(path, KERNEL_AUX_XATTR, b"\xff" * max(len(aux), 8))
    except OSError as exc:
        log.warning(
            "open.unvouched_discard_failed",
            blob=blob,
            file=str(path),
            errno=exc.errno,
            error=str(exc),
        )
        return None
    log.warning("open.unvouched_file_discarded", blob=blob, file=str(path))
    return st.st_ino
