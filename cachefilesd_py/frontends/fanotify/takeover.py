"""A new worker answers the events a dead one read and left unanswered (the orphans).

The kernel keeps such an event pending on the group, with the dead worker's fd number,
and its reader asleep, until someone answers that number (``inflight.py``;
docs/protocol-fanotify.md, "Failover"). :func:`answer_orphans` runs in the successor
after its images are back (blobs opened, identities known) and **before** its reader
reads anything, so no new event can carry an orphan's number. For each orphan:

- its file is the one its identity names (or, if the dead worker did not get as far as
  noting it, every served file the range falls into);
- the range is made present the way a live worker would: ``Engine.ensure`` through a
  **silent** fd of that file. The event's own fd died with the worker, and an fd opened
  now would raise a pre-content event of its own (the file is marked) which nobody
  reads yet; the silent fds were opened by the supervisor before any mark existed
  (``daemon/fanotify_keeper.py``), and a file opened before its mark never raises one
  (docs/protocol-fanotify.md, trap 2);
- then ``FAN_ALLOW`` with the orphan's number; a failed fill, or a file not served any
  more, ``FAN_DENY_ERRNO`` (EIO through EROFS) — never an allow over a hole. ENOENT means
  the dead worker had answered it already (it died before marking it done).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import CachefilesdError
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.driver import EventFdSink
from cachefilesd_py.frontends.fanotify.images import ServedBlob
from cachefilesd_py.frontends.fanotify.inflight import Orphan
from cachefilesd_py.kernel import fanotify
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("fanotify")

Identity = tuple[int, int]


@dataclass
class TakeoverReport:
    allowed: int = 0
    denied: int = 0
    #: answered already by the dead worker (the kernel said ENOENT)
    gone: int = 0
    unidentified: int = 0
    errors: list[str] = field(default_factory=list)


def _targets(orphan: Orphan, served: Sequence[ServedBlob]) -> list[ServedBlob] | None:
    """The files whose range must be present before the orphan is allowed; None if
    the orphan cannot be served (its file is not served, or it has no range)."""
    if orphan.range is None:
        return None
    if orphan.identity is not None:
        match = [b for b in served if b.identity == orphan.identity]
        return match or None
    return [b for b in served if orphan.range.offset < b.size]


def _fill(
    engine: Engine,
    target: ServedBlob,
    orphan: Orphan,
    silent: dict[Identity, int],
    fetch_timeout: float,
) -> None:
    assert orphan.range is not None
    offset = orphan.range.offset
    length = min(orphan.range.end, target.size) - offset
    if length <= 0:
        return
    fd = silent.get(target.identity)
    if fd is None:
        raise OSError(errno.EBADF, f"no silent fd for {target.key}")
    borrowed = OwnedFd(fd, closer=lambda _n: None)  # the supervisor's fd: never closed here
    engine.ensure(
        target.blob,
        offset,
        length,
        EventFdSink(borrowed, target.size),
        Deadline.after(fetch_timeout),
    )


def _answer_one(
    group_fd: int,
    engine: Engine,
    orphan: Orphan,
    served: Sequence[ServedBlob],
    silent: dict[Identity, int],
    deny_errno: int,
    fetch_timeout: float,
) -> tuple[str, str | None]:
    targets = _targets(orphan, served)
    why = None
    if targets is None:
        why = "its file is not served" if orphan.range is not None else "no range"
    else:
        try:
            for target in targets:
                _fill(engine, target, orphan, silent, fetch_timeout)
        except (CachefilesdError, OSError) as exc:
            why = str(exc)
    record = wire.allow(orphan.fd) if why is None else wire.deny(orphan.fd, deny_errno)
    try:
        fanotify.write_response(group_fd, record)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "gone", None
        if why is not None and exc.errno == errno.EINVAL and deny_errno != errno.EPERM:
            fanotify.write_response(group_fd, wire.deny(orphan.fd))
        else:
            return "error", f"fd {orphan.fd}: {exc}"
    return ("allowed", None) if why is None else ("denied", why)


def answer_orphans(
    group_fd: int,
    engine: Engine,
    orphans: Sequence[Orphan],
    served: Sequence[ServedBlob],
    silent: dict[Identity, int],
    *,
    deny_errno: int,
    fetch_timeout: float,
    workers: int = 8,
) -> TakeoverReport:
    """Answer every orphan (see the module docstring), fills in parallel."""
    report = TakeoverReport()
    if not orphans:
        return report
    report.unidentified = sum(1 for o in orphans if o.identity is None)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(orphans)))) as pool:
        results = list(
            pool.map(
                lambda o: _answer_one(
                    group_fd, engine, o, served, silent, deny_errno, fetch_timeout
                ),
                orphans,
            )
        )
    for orphan, (outcome, why) in zip(orphans, results, strict=True):
        if outcome == "allowed":
            report.allowed += 1
        elif outcome == "gone":
            report.gone += 1
        elif outcome == "denied":
            report.denied += 1
            log.warning("fanotify.orphan_denied", fd=orphan.fd, pid=orphan.pid, why=why)
        else:
            report.errors.append(why or "")
            log.error("fanotify.orphan_unanswered", fd=orphan.fd, error=why)
    log.info(
        "fanotify.orphans_answered",
        orphans=len(orphans),
        allowed=report.allowed,
        denied=report.denied,
        gone=report.gone,
        unidentified=report.unidentified,
    )
    return report
