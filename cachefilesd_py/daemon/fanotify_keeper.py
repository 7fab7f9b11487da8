"""The supervisor's hold on the fanotify group (fanotify mode): never fail open.

Closing a pre-content group's last fd makes the kernel allow every pending event and
stop asking: reads of holes in the mounts it served return zeros
(docs/protocol-fanotify.md, trap 1). So, as with ``/dev/cachefiles`` in on-demand mode
(``daemon/keeper.py``), the group belongs to the supervisor, which never reads it, and
workers inherit it (docs/failover.md, "fanotify mode"). What the supervisor holds:

- ``group``: the ``FAN_CLASS_PRE_CONTENT`` group; its marks live with it, so they
  survive every worker;
- ``journal``: the in-flight journal (``frontends/fanotify/inflight.py``), a memfd
  every worker reads events into, so a successor can answer what a dead worker had
  read and not answered;
- ``silent``: one fd per configured cache file, opened **before** any mark of this group
  existed on it: writes through it raise no pre-content event (the kernel decides that
  at open). A successor fills a dead worker's orphans through them before its own
  reader runs (``frontends/fanotify/takeover.py``).

Under systemd all of them go into the fd store (``FDNAME=fanotify``,
``fanotify-inflight``, ``fanotify-file<n>``; ``FDPOLL=0``), so the supervisor's own death
keeps the group — and the mounts' marks — alive, and a restarted supervisor takes them
back (a group is recognised by ``/proc/self/fd``'s ``anon_inode:[fanotify]``, a journal
by its header, a silent fd by the device and inode of a configured cache file). Without
systemd the supervisor's death closes the group: the same as on-demand mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import systemd
from cachefilesd_py.frontends.fanotify import images
from cachefilesd_py.frontends.fanotify.inflight import InflightJournal
from cachefilesd_py.kernel import fanotify
from cachefilesd_py.kernel.fd import OwnedFd

log = structlog.get_logger("daemon")

GROUP_FDNAME = "fanotify"
JOURNAL_FDNAME = "fanotify-inflight"
FILE_FDNAME = "fanotify-file"


@dataclass
class FanotifyHold:
    """What a worker inherits from the supervisor in fanotify mode."""

    group: OwnedFd
    journal_fd: OwnedFd
    #: (st_dev, st_ino) of a cache file -> an fd of it that raises no events
    silent: dict[tuple[int, int], int] = field(default_factory=dict)


def is_fanotify_group(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[fanotify]"
    except OSError:
        return False


def cache_files(config: Config) -> list[str]:
    assert config.dir is not None
    from pathlib import Path

    return [
        str(images.cache_path(Path(config.dir), k.volume.decode(), k.name.decode()))
        for spec in config.fanotify_images
        for k in images.blob_keys(spec)
    ]


def _open_silent(path: str) -> int | None:
    """The cache file, created if missing, opened read-write (O_NOFOLLOW)."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("fanotify.silent_fd_failed", file=path, error=str(exc))
        return None


class FanotifyKeeper:
    """Owns the group, the journal and the silent fds (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        store: Callable[[int, str], bool] = systemd.fdstore,
        enabled: Callable[[], bool] = systemd.under_systemd,
    ) -> None:
        self.config = config
        self._store = store
        self._enabled = enabled
        self.hold: FanotifyHold | None = None
        self.journal: InflightJournal | None = None
        #: "fdstore" (taken back) or "created"
        self.origin = ""
        #: a dead worker is always replaced in this mode
        self.can_restore = True
        self.device = None

    def acquire(self, passed: dict[str, int]) -> FanotifyHold:
        group_fd = passed.pop(GROUP_FDNAME, None)
        journal_fd = passed.pop(JOURNAL_FDNAME, None)
        stored_files = [passed.pop(n) for n in list(passed) if n.startswith(FILE_FDNAME)]
        for name, other in passed.items():
            log.warning("fdstore.unknown_fd", name=name, fd=other)
            os.close(other)
        group: OwnedFd | None = None
        if group_fd is not None:
            if is_fanotify_group(group_fd):
                group, self.origin = OwnedFd(group_fd), "fdstore"
                log.info("fdstore.fanotify_group_restored", fd=group_fd)
            else:
                log.error("fdstore.not_a_fanotify_group", fd=group_fd)
                os.close(group_fd)
        journal = None
        if journal_fd is not None:
            owned = OwnedFd(journal_fd)
            try:
                journal = InflightJournal.attach(owned)
            except ValueError as exc:
                log.error("fdstore.journal_refused", error=str(exc))
                owned.close()
            if journal is not None and group is None:  # its events died with the group
                journal.close()
                owned.close()
                journal = None
        if group is None:
            group, self.origin = fanotify.pre_content_group(), "created"
            for fd in stored_files:  # opened before marks of a group that is gone
                os.close(fd)
            stored_files = []
        if journal is None:
            journal = InflightJournal.create()
            if self.origin == "fdstore":
                journal.set_up = True  # the group's marks and mounts are live: adopt
                log.error(
                    "fdstore.journal_missing",
                    consequence="events a dead worker read are not known: their "
                    "readers wait until the group closes",
                )
        silent = self._silent_fds(stored_files)
        self.journal = journal
        self.hold = FanotifyHold(group, journal.fd, silent)
        if self._enabled():
            self._store_all()
        return self.hold

    def _silent_fds(self, stored: list[int]) -> dict[tuple[int, int], int]:
        by_identity: dict[tuple[int, int], int] = {}
        for fd in stored:
            try:
                st = os.fstat(fd)
                by_identity[(st.st_dev, st.st_ino)] = fd
            except OSError:
                os.close(fd)
        silent: dict[tuple[int, int], int] = {}
        for path in cache_files(self.config):
            try:
                st = os.stat(path, follow_symlinks=False)
                identity = (st.st_dev, st.st_ino)
            except OSError:
                identity = None
            if identity is not None and identity in by_identity:
                silent[identity] = by_identity.pop(identity)
                continue
            opened = _open_silent(path)
            if opened is None:
                continue
            st = os.fstat(opened)
            silent[(st.st_dev, st.st_ino)] = opened
        for fd in by_identity.values():  # files no longer configured
            os.close(fd)
        return silent

    def _store_all(self) -> None:
        assert self.hold is not None
        ok = self._store(self.hold.group.fileno(), GROUP_FDNAME)
        ok = self._store(self.hold.journal_fd.fileno(), JOURNAL_FDNAME) and ok
        for i, fd in enumerate(self.hold.silent.values()):
            ok = self._store(fd, f"{FILE_FDNAME}{i}") and ok
        if ok:
            log.info("fdstore.stored", fanotify_group=self.hold.group.fileno(),
                     files=len(self.hold.silent))

    def close(self) -> None:
        """At the supervisor's exit, after every worker: the last mount is gone by then
        (a stop unmounts before the worker ends)."""
        hold, self.hold = self.hold, None
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if hold is None:
            return
        for fd in hold.silent.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        hold.journal_fd.close()
        hold.group.close()
