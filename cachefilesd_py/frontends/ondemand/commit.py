"""Waiting for the kernel to commit a new cache file after CLOSE.

A new blob's cache file is an unlinked tmpfile until its cookie is withdrawn; the
kernel links it into the cache tree right after it sent CLOSE (``docs/protocol-
ondemand.md`` §5.2). The blob's presence sidecar may be bound to the file only once it
is reachable, so the driver polls for it briefly. If the file does not come (the cache
died, the kernel kept the old one), the sidecar stays unbound: a miss later, never
wrong data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

#: how long to wait for the kernel to link a new cache file after CLOSE
COMMIT_WAIT: Final = 5.0
#: how often to look
COMMIT_POLL: Final = 0.02


def wait_commit(
    path: Path | None, stale_ino: int | None, timeout: float = COMMIT_WAIT
) -> Path | None:
    """``path`` once a file other than the stale one (inode ``stale_ino``) is there,
    or None if none comes within ``timeout`` seconds."""
    if path is None:
        return None
    end = time.monotonic() + timeout
    while True:
        try:
            if path.stat().st_ino != stale_ino:
                return path
        except FileNotFoundError:
            pass
        if time.monotonic() >= end:
            return None
        time.sleep(COMMIT_POLL)
