"""The open-file limit: raised at start and checked against the configured work.

In on-demand mode every blob the kernel has open holds one anonymous fd in the serving
worker (one per mounted EROFS image or extra device, for as long as it is mounted), and
a ``file://`` source keeps the blob's source file open too. Next to those, a fixed
number: the device, logs, the presence store and the sidecar being written, HTTP
connections (``fetch_concurrency`` per origin), inotify, the control channel. When the
limit runs out, the kernel fails the next OPEN (the mount or lookup fails: the kernel
cannot install the anonymous fd), so a limit too low for the work is worth a clear
word at start rather than failures later.

Classic mode needs only the fixed part (the tree index uses inotify watches, not fds).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from cachefilesd_py.config.model import Config

#: fds the daemon uses besides the per-blob ones
BASE_FDS = 64
#: below this many concurrently open blobs the daemon refuses to start
MIN_BLOBS = 16
#: below this many it warns (a host with many images mounts hundreds)
WARN_BLOBS = 1024


class NofileTooLow(OSError):
    pass


@dataclass(frozen=True)
class NofileBudget:
    limit: int
    fixed: int
    per_blob: int

    @property
    def blobs(self) -> int:
        """How many blobs can be open at once within the limit."""
        return max(0, (self.limit - self.fixed) // self.per_blob)


def budget(config: Config, limit: int) -> NofileBudget:
    origins = {rule.url_template.split("/", 3)[2] for rule in config.sources if "://" in
               rule.url_template and not rule.url_template.startswith("file:")}
    fixed = BASE_FDS + config.fetch_concurrency * max(1, len(origins))
    per_blob = 1 + any(r.url_template.startswith("file:") for r in config.sources)
    return NofileBudget(limit, fixed, per_blob)


def raise_nofile() -> int:
    """Raise the soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else hard


def check(config: Config, limit: int) -> NofileBudget:
    """Raise :class:`NofileTooLow` when the limit cannot carry the configured work;
    the caller warns when :attr:`NofileBudget.blobs` is below :data:`WARN_BLOBS`."""
    b = budget(config, limit)
    if limit < BASE_FDS or (config.ondemand and b.blobs < MIN_BLOBS):
        raise NofileTooLow(
            24,  # EMFILE
            f"the open-file limit is {limit}: too low for this configuration "
            f"({b.fixed} fds fixed + {b.per_blob} per open blob in on-demand mode, "
            f"room for {b.blobs} blobs; at least {MIN_BLOBS} needed). Raise it "
            "(LimitNOFILE= in the unit, ulimit -n, or limits.conf)",
        )
    return b
