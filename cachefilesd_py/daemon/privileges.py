"""Least privilege: once the device is bound, the daemon keeps no capability at all.

Why none is needed (fs/cachefiles in 6.12, and what the daemon itself touches):

- the kernel checks ``CAP_SYS_ADMIN`` only when ``/dev/cachefiles`` is opened; after
  that every command and the READ_COMPLETE ioctl work on the open fd alone, and the
  kernel does its own cache-file work (lookups, tmpfiles, ``cull``, ``inuse``) under the
  credentials it copied at ``bind``;
- what the daemon opens itself is owned by root: the kernel creates ``cache/`` and
  ``graveyard/`` and every directory (0700) and file (0600) in them with the binding
  process's uid, and the daemon creates its own ``cachefilesd-py/`` tree. As uid 0 it
  has the owner's access to all of it without ``CAP_DAC_OVERRIDE``: writing through
  the anonymous fds, reading and spoiling ``user.CacheFiles.cache``, the sidecars and
  their ``user.`` xattrs, punching holes when trimming, emptying the graveyard;
- ``file://`` sources are read as uid 0 without ``CAP_DAC_READ_SEARCH``: their files
  must be readable by root as owner, group or other (a tree of mode 0644 files is).

So the supervisor drops everything right after binding (before any worker exists, so
every worker starts without capabilities), and sets no-new-privileges. Under systemd
``CapabilityBoundingSet=CAP_SYS_ADMIN`` already limits the start to the one capability
the open needs. A daemon that took the device back from the fd store never needed
even that. Verified in the guest tests: serving, culling and trimming with every set
empty (``tests/vm/test_failover_guest.py``).
"""

from __future__ import annotations

import errno
import os

import structlog

from cachefilesd_py.kernel import caps

log = structlog.get_logger("daemon")


def drop_after_bind(cache_dir: str) -> caps.DropResult | None:
    """Drop every capability; None (and a warning) if the process may not change them."""
    try:
        result = caps.drop_all_but(0)
    except OSError as exc:
        log.warning("privileges.not_dropped", error=str(exc))
        return None
    log.info(
        "privileges.dropped",
        had=caps.names(result.before.permitted),
        kept=caps.names(result.after.permitted),
        bounding_set_reduced=result.bounding_reduced,
    )
    if not os.access(cache_dir, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"{cache_dir} is not usable without CAP_DAC_OVERRIDE: the cache directory "
            "must be root's (or readable, writable and searchable by root as group or "
            "other)",
        )
    return result
